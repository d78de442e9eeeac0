//! The charts' marks rasterized into a PNG at twice the SVG's size, text drawn with the 8×8
//! bitmap font of `font8x8` (built in: a benchmark machine needs no system fonts).
//! No anti-aliasing: the PNG is for looking at a run, the SVG for anything finer.

use std::path::Path;

use font8x8::UnicodeFonts;

use super::{layout, Anchor, Chart, Mark, Rgb};

/// Device pixels per SVG pixel.
const SCALE: f64 = 2.0;
/// Font pixels per glyph cell side.
const GLYPH: usize = 8;

/// Writes the charts stacked vertically into a PNG at `path`.
pub fn write_png(path: &Path, charts: &[Chart]) -> std::io::Result<()> {
    let canvas = rasterize(charts);
    let file = std::fs::File::create(path)?;
    let mut encoder = ::png::Encoder::new(
        std::io::BufWriter::new(file),
        canvas.width as u32,
        canvas.height as u32,
    );
    encoder.set_color(::png::ColorType::Rgb);
    encoder.set_depth(::png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&canvas.pixels)
        .map_err(std::io::Error::other)?;
    Ok(())
}

/// RGB pixels, row by row.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

fn rasterize(charts: &[Chart]) -> Canvas {
    let figure = layout(charts);
    let width = (figure.width * SCALE).round() as usize;
    let height = (figure.height * SCALE).round() as usize;
    let mut canvas = Canvas {
        width,
        height,
        pixels: vec![255; width * height * 3],
    };
    for mark in &figure.marks {
        match mark {
            Mark::Segment {
                from,
                to,
                color,
                width,
            } => canvas.line(scaled(*from), scaled(*to), *color, *width),
            Mark::Polyline {
                points,
                color,
                width,
            } => {
                for pair in points.windows(2) {
                    canvas.line(scaled(pair[0]), scaled(pair[1]), *color, *width);
                }
            }
            Mark::Text {
                at,
                anchor,
                size,
                bold,
                vertical,
                text,
            } => canvas.text(scaled(*at), *anchor, *size, *bold, *vertical, text),
        }
    }
    canvas
}

fn scaled((x, y): (f64, f64)) -> (i64, i64) {
    ((x * SCALE).round() as i64, (y * SCALE).round() as i64)
}

/// The glyph of `c`, rows top to bottom, bit 0 the leftmost pixel; `?` for what the font lacks.
fn glyph(c: char) -> [u8; 8] {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&color.0);
    }

    /// Bresenham's line with a square brush as wide as the stroke.
    fn line(&mut self, from: (i64, i64), to: (i64, i64), color: Rgb, width: f64) {
        let brush = ((width * SCALE).round() as i64).max(1);
        let offset = (brush - 1) / 2;
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (step_x, step_y) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            for bx in 0..brush {
                for by in 0..brush {
                    self.set(x + bx - offset, y + by - offset, color);
                }
            }
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += step_x;
            }
            if e2 <= dx {
                err += dx;
                y += step_y;
            }
        }
    }

    /// Text whose baseline passes through `at`, placed by `anchor` along its direction.
    fn text(
        &mut self,
        at: (i64, i64),
        anchor: Anchor,
        size: f64,
        bold: bool,
        vertical: bool,
        text: &str,
    ) {
        // Font pixels per device pixel side: 12 px text gets 2, a 15 px title 3.
        let unit = ((size * SCALE / 12.0).round() as i64).max(1);
        let cell = GLYPH as i64 * unit;
        let length = text.chars().count() as i64 * cell;
        let start = match anchor {
            Anchor::Start => 0,
            Anchor::Middle => -length / 2,
            Anchor::End => -length,
        };
        // The glyphs' last row sits just under the baseline.
        let top = -(GLYPH as i64 - 1) * unit;
        // A point `along` the text and `down` from its top, turned a quarter left when
        // vertical (the text then reads upwards).
        let place = |along: i64, down: i64| {
            if vertical {
                (at.0 + down, at.1 - along)
            } else {
                (at.0 + along, at.1 + down)
            }
        };
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            let left = start + i as i64 * cell;
            for (row, bits) in rows.iter().enumerate() {
                for column in 0..GLYPH {
                    if bits & (1 << column) == 0 {
                        continue;
                    }
                    for ux in 0..unit + i64::from(bold) {
                        for uy in 0..unit {
                            let along = left + column as i64 * unit + ux;
                            let (x, y) = place(along, top + row as i64 * unit + uy);
                            self.set(x, y, Rgb::BLACK);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Line, PALETTE};
    use super::*;

    fn chart(title: &str) -> Chart {
        Chart {
            title: title.into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            lines: vec![Line {
                name: "train loss".into(),
                color: PALETTE[0],
                points: (0..10).map(|i| (i as f64, (i * i) as f64)).collect(),
            }],
        }
    }

    fn black_pixels(canvas: &Canvas, rows: std::ops::Range<usize>) -> usize {
        rows.map(|y| {
            (0..canvas.width)
                .filter(|&x| {
                    let i = (y * canvas.width + x) * 3;
                    canvas.pixels[i..i + 3] == [0, 0, 0]
                })
                .count()
        })
        .sum()
    }

    #[test]
    fn writes_a_png_with_the_curve_and_the_text_drawn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("curve.png");
        write_png(&path, &[chart("a title"), chart("another")]).expect("write");
        let decoder = ::png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&path).expect("open"),
        ));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!((info.width, info.height), (1520, 1280), "two panels at 2×");
        let red = buf.chunks(3).filter(|p| p == &PALETTE[0].0).count();
        assert!(red > 1000, "the curve and its legend ({red} red pixels)");
    }

    #[test]
    fn text_is_drawn_where_the_layout_puts_it() {
        let with_title = rasterize(&[chart("a long title for the chart")]);
        let without = rasterize(&[chart("")]);
        // The title's band: the first 40 SVG pixels of the panel.
        let title_band = 0..80;
        assert_eq!(black_pixels(&without, title_band.clone()), 0);
        assert!(black_pixels(&with_title, title_band) > 300);
        // The x axis' label ("step", baseline 38 SVG pixels under the axis at 250) and the
        // legend's name (baseline 62 under it) are drawn in their bands, below the tick labels.
        assert!(black_pixels(&without, 560..580) > 100, "the x label");
        assert!(black_pixels(&without, 604..626) > 200, "the legend");
    }

    #[test]
    fn vertical_text_reads_upwards_and_unknown_characters_get_a_mark() {
        let mut canvas = Canvas {
            width: 100,
            height: 100,
            pixels: vec![255; 100 * 100 * 3],
        };
        canvas.text((50, 50), Anchor::Start, 12.0, false, true, "ab");
        let black: Vec<(usize, usize)> = (0..100 * 100)
            .filter(|i| canvas.pixels[i * 3] == 0)
            .map(|i| (i % 100, i / 100))
            .collect();
        assert!(!black.is_empty());
        assert!(
            black.iter().all(|&(x, y)| y <= 50 && x >= 36),
            "the text runs up from the anchor, its top to the left of it"
        );
        assert_eq!(glyph('\u{2603}'), glyph('?'));
        assert_ne!(glyph('a'), [0; 8]);
    }
}

//! A minimal line-chart writer for benchmark curves: series of (x, y) points drawn as polylines
//! in separate panels of one PNG (no text: the benchmark prints the numbers and the legend).

use std::path::Path;

/// One panel: its series share the panel's axes (each series is scaled to the panel's range).
pub struct Panel {
    pub series: Vec<Series>,
}

pub struct Series {
    pub points: Vec<(f64, f64)>,
    pub rgb: [u8; 3],
}

const WIDTH: usize = 800;
const PANEL_HEIGHT: usize = 300;
const MARGIN: usize = 20;

/// Writes the panels stacked vertically into a PNG at `path`.
pub fn write_png(path: &Path, panels: &[Panel]) -> std::io::Result<()> {
    let height = PANEL_HEIGHT * panels.len().max(1);
    let mut pixels = vec![255u8; WIDTH * height * 3];
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut pixels, i * PANEL_HEIGHT, panel);
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&pixels)
        .map_err(std::io::Error::other)?;
    Ok(())
}

fn draw_panel(pixels: &mut [u8], top: usize, panel: &Panel) {
    let (x0, x1) = (MARGIN, WIDTH - MARGIN);
    let (y0, y1) = (top + MARGIN, top + PANEL_HEIGHT - MARGIN);
    let grey = [160, 160, 160];
    line(pixels, (x0, y1), (x1, y1), grey);
    line(pixels, (x0, y0), (x0, y1), grey);
    let all = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut min_x, mut max_x, mut min_y, mut max_y) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        min_x = min_x.min(x);
        max_x = max_x.max(x);
        min_y = min_y.min(y);
        max_y = max_y.max(y);
    }
    if min_x > max_x {
        return;
    }
    let span = |lo: f64, hi: f64| if hi > lo { hi - lo } else { 1.0 };
    let to_px = |(x, y): (f64, f64)| {
        let px = x0 as f64 + (x - min_x) / span(min_x, max_x) * (x1 - x0) as f64;
        let py = y1 as f64 - (y - min_y) / span(min_y, max_y) * (y1 - y0) as f64;
        (px.round() as usize, py.round() as usize)
    };
    for series in &panel.series {
        let points: Vec<(usize, usize)> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&p| to_px(p))
            .collect();
        for pair in points.windows(2) {
            line(pixels, pair[0], pair[1], series.rgb);
        }
        for &(x, y) in &points {
            for dx in 0..3 {
                for dy in 0..3 {
                    set(
                        pixels,
                        (x + dx).saturating_sub(1),
                        (y + dy).saturating_sub(1),
                        series.rgb,
                    );
                }
            }
        }
    }
}

fn set(pixels: &mut [u8], x: usize, y: usize, rgb: [u8; 3]) {
    let i = (y * WIDTH + x) * 3;
    if x < WIDTH && i + 3 <= pixels.len() {
        pixels[i..i + 3].copy_from_slice(&rgb);
    }
}

/// Bresenham's line.
fn line(pixels: &mut [u8], from: (usize, usize), to: (usize, usize), rgb: [u8; 3]) {
    let (mut x, mut y) = (from.0 as i64, from.1 as i64);
    let (x_end, y_end) = (to.0 as i64, to.1 as i64);
    let (dx, dy) = ((x_end - x).abs(), -(y_end - y).abs());
    let (sx, sy) = (
        if x < x_end { 1 } else { -1 },
        if y < y_end { 1 } else { -1 },
    );
    let mut err = dx + dy;
    loop {
        set(pixels, x as usize, y as usize, rgb);
        if x == x_end && y == y_end {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_the_curve_drawn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("curve.png");
        let panel = Panel {
            series: vec![Series {
                points: (0..10).map(|i| (i as f64, (i * i) as f64)).collect(),
                rgb: [200, 0, 0],
            }],
        };
        write_png(&path, &[panel]).expect("write");
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&path).expect("open"),
        ));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!(
            (info.width, info.height),
            (WIDTH as u32, PANEL_HEIGHT as u32)
        );
        let red = buf.chunks(3).filter(|p| p == &[200, 0, 0]).count();
        assert!(red > 100, "the curve should be drawn ({red} red pixels)");
    }
}

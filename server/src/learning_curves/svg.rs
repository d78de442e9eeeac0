//! The charts' marks written as one SVG document (text left to the viewer's sans-serif font).

use std::fmt::Write as _;

use super::{layout, Anchor, Chart, Mark};

/// The charts stacked vertically in one SVG document.
pub fn render_svg(charts: &[Chart]) -> String {
    let figure = layout(charts);
    let (width, height) = (figure.width, figure.height);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for mark in &figure.marks {
        write_mark(&mut svg, mark);
    }
    svg.push_str("</svg>\n");
    svg
}

fn write_mark(svg: &mut String, mark: &Mark) {
    // Writing to a String cannot fail.
    let _ = match mark {
        Mark::Segment {
            from,
            to,
            color,
            width,
        } => writeln!(
            svg,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\"{}/>",
            from.0,
            from.1,
            to.0,
            to.1,
            color.hex(),
            stroke_width(*width)
        ),
        Mark::Polyline {
            points,
            color,
            width,
        } => {
            let points: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            writeln!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\"{}/>",
                points.join(" "),
                color.hex(),
                stroke_width(*width)
            )
        }
        Mark::Text {
            at: (x, y),
            anchor,
            size,
            bold,
            vertical,
            text,
        } => {
            let anchor = match anchor {
                Anchor::Start => "start",
                Anchor::Middle => "middle",
                Anchor::End => "end",
            };
            let mut attributes = format!("x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\"");
            if *size != 12.0 {
                let _ = write!(attributes, " font-size=\"{size}\"");
            }
            if *bold {
                attributes.push_str(" font-weight=\"bold\"");
            }
            if *vertical {
                let _ = write!(attributes, " transform=\"rotate(-90 {x:.1} {y:.1})\"");
            }
            writeln!(svg, "<text {attributes}>{}</text>", escape(text))
        }
    };
}

fn stroke_width(width: f64) -> String {
    if width == 1.0 {
        String::new()
    } else {
        format!(" stroke-width=\"{width}\"")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::super::{Line, PALETTE};
    use super::*;

    #[test]
    fn text_is_escaped_and_empty_charts_still_render() {
        let chart = Chart {
            title: "a <b> & \"c\"".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            lines: vec![Line {
                name: "nothing yet".into(),
                color: PALETTE[0],
                points: vec![(f64::NAN, 1.0)],
            }],
        };
        let svg = render_svg(&[chart]);
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"), "{svg}");
        assert!(!svg.contains("NaN"), "{svg}");
        assert!(svg.contains("stroke=\"#c03030\""), "{svg}");
    }
}

//! Learning curves a person can read: line charts with a title, axes with tick labels and a
//! legend, one panel per measure, stacked. [`layout`] places them once as marks; [`svg`] writes
//! them as SVG (`GET /v1/finetune/{id}/curves.svg` draws a job's from its events) and `png`
//! rasterizes the same marks with a built-in bitmap font (`mezo bench mezo` writes both).

#[cfg(feature = "bench")]
pub mod png;
pub mod svg;

pub use svg::render_svg;

use crate::training::job::{EventKind, JobEvent};

/// One panel: its lines share the axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Its name in the legend.
    pub name: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

/// A colour, drawn as `#rrggbb` in SVG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub [u8; 3]);

impl Rgb {
    pub const BLACK: Rgb = Rgb([0, 0, 0]);
    /// Grid lines.
    pub const LIGHT_GREY: Rgb = Rgb([0xe4, 0xe4, 0xe4]);

    pub fn hex(self) -> String {
        let [r, g, b] = self.0;
        format!("#{r:02x}{g:02x}{b:02x}")
    }
}

/// The colours lines take in turn.
pub const PALETTE: [Rgb; 4] = [
    Rgb([0xc0, 0x30, 0x30]),
    Rgb([0x28, 0x50, 0xc8]),
    Rgb([0x20, 0x80, 0x40]),
    Rgb([0xa0, 0x60, 0x00]),
];

/// Where a text's anchor point is: its start, middle or end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// What a figure is drawn with, in pixels from the top left; [`svg`] writes the marks as SVG
/// elements and `png` (with the `bench` feature) rasterizes them, so both show the same chart.
#[derive(Debug, Clone, PartialEq)]
pub enum Mark {
    Segment {
        from: (f64, f64),
        to: (f64, f64),
        color: Rgb,
        width: f64,
    },
    Polyline {
        points: Vec<(f64, f64)>,
        color: Rgb,
        width: f64,
    },
    Text {
        /// The anchor point, on the text's baseline.
        at: (f64, f64),
        anchor: Anchor,
        /// Font size in pixels.
        size: f64,
        bold: bool,
        /// Turned a quarter left, reading upwards (the y axis' label).
        vertical: bool,
        text: String,
    },
}

/// Charts laid out as marks on a white page.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub width: f64,
    pub height: f64,
    pub marks: Vec<Mark>,
}

const WIDTH: f64 = 760.0;
const PANEL_HEIGHT: f64 = 320.0;
/// Room for the y tick labels and the y label on the left, for the x ticks, the x label and
/// the legend below, and for the title above.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 70.0;
/// The font size of labels; titles are larger.
const TEXT_SIZE: f64 = 12.0;
const TITLE_SIZE: f64 = 15.0;

/// The charts stacked vertically, one panel each.
pub fn layout(charts: &[Chart]) -> Figure {
    let mut marks = Vec::new();
    for (i, chart) in charts.iter().enumerate() {
        lay_out_chart(&mut marks, i as f64 * PANEL_HEIGHT, chart);
    }
    Figure {
        width: WIDTH,
        height: PANEL_HEIGHT * charts.len().max(1) as f64,
        marks,
    }
}

fn text(at: (f64, f64), anchor: Anchor, text: impl Into<String>) -> Mark {
    Mark::Text {
        at,
        anchor,
        size: TEXT_SIZE,
        bold: false,
        vertical: false,
        text: text.into(),
    }
}

fn lay_out_chart(marks: &mut Vec<Mark>, top: f64, chart: &Chart) {
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (top + TOP, top + PANEL_HEIGHT - BOTTOM);
    marks.push(Mark::Text {
        at: ((x0 + x1) / 2.0, top + 22.0),
        anchor: Anchor::Middle,
        size: TITLE_SIZE,
        bold: true,
        vertical: false,
        text: chart.title.clone(),
    });
    let finite_points = |line: &Line| -> Vec<(f64, f64)> {
        line.points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .copied()
            .collect()
    };
    let finite: Vec<(f64, f64)> = chart.lines.iter().flat_map(finite_points).collect();
    let (x_range, y_range) = if finite.is_empty() {
        ((0.0, 1.0), (0.0, 1.0))
    } else {
        (
            padded(finite.iter().map(|p| p.0)),
            padded(finite.iter().map(|p| p.1)),
        )
    };
    let sx = |x: f64| x0 + (x - x_range.0) / (x_range.1 - x_range.0) * (x1 - x0);
    let sy = |y: f64| y1 - (y - y_range.0) / (y_range.1 - y_range.0) * (y1 - y0);
    for tick in ticks(y_range.0, y_range.1) {
        let y = sy(tick);
        marks.push(Mark::Segment {
            from: (x0, y),
            to: (x1, y),
            color: Rgb::LIGHT_GREY,
            width: 1.0,
        });
        marks.push(text((x0 - 6.0, y + 4.0), Anchor::End, tick_label(tick)));
    }
    for tick in ticks(x_range.0, x_range.1) {
        let x = sx(tick);
        marks.push(Mark::Segment {
            from: (x, y1),
            to: (x, y1 + 5.0),
            color: Rgb::BLACK,
            width: 1.0,
        });
        marks.push(text((x, y1 + 18.0), Anchor::Middle, tick_label(tick)));
    }
    marks.push(Mark::Polyline {
        points: vec![(x0, y0), (x0, y1), (x1, y1)],
        color: Rgb::BLACK,
        width: 1.0,
    });
    marks.push(text(
        ((x0 + x1) / 2.0, y1 + 38.0),
        Anchor::Middle,
        &chart.x_label,
    ));
    marks.push(Mark::Text {
        at: (16.0, (y0 + y1) / 2.0),
        anchor: Anchor::Middle,
        size: TEXT_SIZE,
        bold: false,
        vertical: true,
        text: chart.y_label.clone(),
    });
    // The legend: one row under the x label, each entry as wide as its name.
    let mut legend_x = x0;
    let legend_y = y1 + 58.0;
    for line in &chart.lines {
        marks.push(Mark::Polyline {
            points: finite_points(line)
                .into_iter()
                .map(|(x, y)| (sx(x), sy(y)))
                .collect(),
            color: line.color,
            width: 1.6,
        });
        marks.push(Mark::Segment {
            from: (legend_x, legend_y),
            to: (legend_x + 20.0, legend_y),
            color: line.color,
            width: 3.0,
        });
        marks.push(text(
            (legend_x + 26.0, legend_y + 4.0),
            Anchor::Start,
            &line.name,
        ));
        // About 7 px per character at 12 px, and a gap.
        legend_x += 26.0 + 7.0 * line.name.chars().count() as f64 + 24.0;
    }
}

/// The range of `values` with 5% of room on each side (one unit when they are all equal).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let room = (hi - lo) * 0.05;
    (lo - room, hi + room)
}

/// Round values (1, 2 or 5 times a power of ten apart) inside `[lo, hi]`, about five of them.
pub fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    if !(raw.is_finite() && raw > 0.0) {
        return Vec::new();
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick's text: no more digits than the value needs.
fn tick_label(value: f64) -> String {
    let text = format!("{value:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

/// A job's curves from its events: the training loss per step, and the held-out loss and each
/// held-out metric per evaluation (a panel each, when the job had held-out examples).
pub fn job_charts(job_id: &str, events: &[JobEvent]) -> Vec<Chart> {
    let train: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e.kind == EventKind::Step)
        .filter_map(|e| Some((e.data["step"].as_f64()?, e.data["train_loss"].as_f64()?)))
        .collect();
    let held_out: Vec<&JobEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::HeldOut)
        .collect();
    let held_out_line = |field: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        held_out
            .iter()
            .filter_map(|e| Some((e.data["steps_done"].as_f64()?, field(&e.data)?)))
            .collect::<Vec<_>>()
    };
    let mut loss_lines = vec![Line {
        name: "train loss (the step's minibatch)".into(),
        color: PALETTE[0],
        points: train,
    }];
    let held_out_loss = held_out_line(&|d| d["loss"].as_f64());
    if !held_out_loss.is_empty() {
        loss_lines.push(Line {
            name: "held-out loss".into(),
            color: PALETTE[1],
            points: held_out_loss,
        });
    }
    let mut charts = vec![Chart {
        title: format!("{job_id}: loss"),
        x_label: "step".into(),
        y_label: "loss".into(),
        lines: loss_lines,
    }];
    let metric_names: std::collections::BTreeSet<String> = held_out
        .iter()
        .filter_map(|e| e.data["metrics"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    if !metric_names.is_empty() {
        let lines = metric_names
            .iter()
            .zip(PALETTE.iter().cycle().skip(1))
            .map(|(name, &color)| Line {
                name: format!("held-out {name}"),
                color,
                points: held_out_line(&|d| d["metrics"][name.as_str()].as_f64()),
            })
            .collect();
        charts.push(Chart {
            title: format!("{job_id}: held-out metrics"),
            x_label: "step".into(),
            y_label: "metric".into(),
            lines,
        });
    }
    charts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::job::EventLevel;
    use serde_json::json;

    fn event(kind: EventKind, data: serde_json::Value) -> JobEvent {
        JobEvent {
            seq: 0,
            created_at: 0,
            level: EventLevel::Info,
            kind,
            message: String::new(),
            data,
        }
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(
            ticks(0.0, 1.0),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(ticks(3.0, 97.0), vec![20.0, 40.0, 60.0, 80.0]);
        assert_eq!(ticks(0.61, 0.69), vec![0.62, 0.64, 0.66, 0.68]);
        assert!(ticks(1.0, 1.0).is_empty());
        assert_eq!(tick_label(0.6000000000000001), "0.6");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(-0.0), "0");
    }

    #[test]
    fn a_job_draws_its_loss_and_its_held_out_metrics_with_labels() {
        let mut events: Vec<JobEvent> = (1..=4)
            .map(|s| {
                event(
                    EventKind::Step,
                    json!({"step": s, "train_loss": 1.0 / s as f64}),
                )
            })
            .collect();
        for (steps, acc) in [(0, 0.5), (4, 0.75)] {
            events.push(event(
                EventKind::HeldOut,
                json!({"steps_done": steps, "loss": 0.7, "metrics": {"accuracy": acc}}),
            ));
        }
        events.push(event(EventKind::Status, json!({"status": "succeeded"})));
        let charts = job_charts("ftjob-1", &events);
        assert_eq!(charts.len(), 2);
        assert_eq!(charts[0].lines[0].points.len(), 4);
        assert_eq!(charts[0].lines[1].points, vec![(0.0, 0.7), (4.0, 0.7)]);
        assert_eq!(charts[1].lines[0].name, "held-out accuracy");
        assert_eq!(charts[1].lines[0].points, vec![(0.0, 0.5), (4.0, 0.75)]);

        let svg = render_svg(&charts);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        for text in [
            "ftjob-1: loss",
            "ftjob-1: held-out metrics",
            ">step<",
            ">loss<",
            "train loss (the step's minibatch)",
            "held-out accuracy",
            ">0.6<",
        ] {
            assert!(svg.contains(text), "missing {text:?} in {svg}");
        }
        assert_eq!(
            svg.matches("<polyline").count(),
            2 + 3,
            "two axes, three lines"
        );
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}

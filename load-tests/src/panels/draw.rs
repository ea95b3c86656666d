//! One panel as an SVG: a title, time on the x axis, a legend, one line per
//! series. Drawn with plotters' SVG backend, like `tollgate-simulate`'s chart.

use std::path::Path;

use plotters::prelude::*;

/// One line of a panel; `None` points are gaps (no data then).
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, Option<f64>)>,
}

/// What a panel shows, besides its lines.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    /// Seconds covered by the x axis (the recording's length).
    pub x_max: f64,
}

/// Matplotlib's "tab10": distinct on white and for most colour blindness.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

const SIZE: (u32, u32) = (820, 340);

pub fn draw(path: &Path, panel: &Panel<'_>, lines: &[Line]) -> anyhow::Result<()> {
    let y_top = lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    // Headroom for the legend; a flat zero line still gets an axis.
    let y_top = if y_top > 0.0 { y_top * 1.35 } else { 1.0 };

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..panel.x_max.max(1.0), 0.0..y_top)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("seconds since the recording started")
        .y_desc(panel.y_desc)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .y_label_formatter(&|v| short_number(*v))
        .draw()?;
    for (line, color) in lines.iter().zip(PALETTE.iter().cycle()) {
        let color = *color;
        let mut labelled = false;
        for segment in segments(&line.points) {
            let series = chart.draw_series(LineSeries::new(segment, color.stroke_width(2)))?;
            if !labelled {
                series.label(line.label.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                labelled = true;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The runs of consecutive points with a value.
fn segments(points: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (x, y) in points {
        match y {
            Some(y) if y.is_finite() => current.push((*x, *y)),
            _ if !current.is_empty() => out.push(std::mem::take(&mut current)),
            _ => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Axis labels without float noise: 1200 → "1.2k", 0.0005 → "0.0005".
fn short_number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_a_line() {
        let points = [
            (0.0, Some(1.0)),
            (1.0, None),
            (2.0, Some(2.0)),
            (3.0, Some(3.0)),
        ];
        assert_eq!(
            segments(&points),
            [vec![(0.0, 1.0)], vec![(2.0, 2.0), (3.0, 3.0)]]
        );
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(short_number(1200.0), "1.2k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(3.0), "3");
    }

    #[test]
    fn draws_title_legend_and_lines() {
        let path = std::env::temp_dir().join(format!("tollgate-panel-{}.svg", std::process::id()));
        let lines = [Line {
            label: "pro".into(),
            points: vec![(0.0, Some(1.0)), (5.0, Some(4.0))],
        }];
        let panel = Panel {
            title: "Requests per second",
            y_desc: "req/s",
            x_max: 5.0,
        };
        draw(&path, &panel, &lines).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        assert!(
            svg.contains("Requests per second") && svg.contains("\npro\n"),
            "{svg}"
        );
    }
}

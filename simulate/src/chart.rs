//! One simulated day as an SVG: instances hot, waking and warm (top panel)
//! and requests waiting in the admission queues (bottom panel), from the
//! per-minute samples of the run.

use std::path::Path;

use plotters::prelude::*;

/// The fleet and the queue at one simulated minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub at_secs: u64,
    pub hot: u32,
    /// Provisioning or starting.
    pub waking: u32,
    pub warm: u32,
    /// Requests waiting for a slot, every pool and tier.
    pub queued: u32,
}

const DAY_SECS: u64 = 86_400;

/// One line of the fleet panel: its legend, colour and value.
type Line = (&'static str, RGBColor, fn(&Sample) -> u32);

/// Draws day `day` (0-based) of `samples` to `path`. `slots` is the number
/// of instance slots configured (the top panel's height).
pub fn draw(
    path: &Path,
    samples: &[Sample],
    day: u64,
    slots: u32,
    title: &str,
) -> anyhow::Result<()> {
    let from = day * DAY_SECS;
    let day_samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| (from..from + DAY_SECS).contains(&s.at_secs))
        .collect();
    let hour = |s: &Sample| (s.at_secs - from) as f64 / 3600.0;
    // Step lines: a value holds until the next sample.
    let steps = |value: fn(&Sample) -> u32| -> Vec<(f64, f64)> {
        let mut points = Vec::with_capacity(day_samples.len() * 2);
        for pair in day_samples.windows(2) {
            let v = f64::from(value(pair[0]));
            points.push((hour(pair[0]), v));
            points.push((hour(pair[1]), v));
        }
        points
    };
    let max_queued = day_samples.iter().map(|s| s.queued).max().unwrap_or(0);

    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (top, bottom) = root.split_vertically(380);

    let mut fleet = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..24f64, 0f64..f64::from(slots.max(1)) + 0.5)?;
    fleet
        .configure_mesh()
        .x_labels(13)
        .x_label_formatter(&|h| format!("{h:.0}h"))
        .y_desc("instances")
        .draw()?;
    let lines: [Line; 3] = [
        ("hot", RGBColor(31, 119, 180), |s| s.hot),
        ("waking (renting, resuming)", RGBColor(255, 127, 14), |s| {
            s.waking
        }),
        ("warm (stopped)", RGBColor(127, 127, 127), |s| s.warm),
    ];
    for (label, color, value) in lines {
        fleet
            .draw_series(LineSeries::new(steps(value), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    fleet
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut queue = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..24f64, 0f64..(f64::from(max_queued) * 1.1).max(1.0))?;
    queue
        .configure_mesh()
        .x_labels(13)
        .x_label_formatter(&|h| format!("{h:.0}h"))
        .x_desc("hour of the simulated day (UTC)")
        .y_desc("requests queued")
        .draw()?;
    let red = RGBColor(214, 39, 40);
    queue
        .draw_series(LineSeries::new(steps(|s| s.queued), red.stroke_width(1)))?
        .label("waiting for a GPU slot")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
    queue
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_chosen_day() {
        let samples: Vec<Sample> = (0..2 * 24 * 60)
            .map(|m| Sample {
                at_secs: m * 60,
                hot: (m % 7) as u32,
                waking: (m % 2) as u32,
                warm: 1,
                queued: (m % 40) as u32,
            })
            .collect();
        let path = std::env::temp_dir().join(format!("tollgate-chart-{}.svg", std::process::id()));
        draw(&path, &samples, 1, 10, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{}",
            &svg[..80]
        );
        assert!(svg.contains("requests queued") && svg.contains("hot"));
    }
}

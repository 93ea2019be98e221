//! `--plot`: the latency percentile curves (HdrHistogram's usual view: the x axis spreads the
//! tail, 90% to 99.999%) drawn by plotters into an SVG file.

use std::path::Path;

use plotters::prelude::*;

use crate::error::LoadError;
use crate::send::stats::{Lat, Stats};

/// Highest percentile drawn: 1 - 1/X_MAX.
const X_MAX: f64 = 100_000.0;

/// Draws every latency kind that has samples into `path`.
pub fn draw(path: &Path, stats: &Stats) -> Result<(), LoadError> {
    let err = |why: String| LoadError::Plot {
        path: path.display().to_string(),
        why,
    };
    let mut series: Vec<(&'static str, Vec<(f64, f64)>)> = Vec::new();
    for kind in Lat::ALL {
        let h = &stats.latency[kind as usize];
        if h.is_empty() {
            continue;
        }
        let mut points = Vec::new();
        for v in h.iter_quantiles(1) {
            let q = v.quantile_iterated_to();
            let x = (1.0 / (1.0 - q).max(1.0 / X_MAX)).min(X_MAX);
            points.push((x, v.value_iterated_to() as f64 / 1000.0));
        }
        series.push((kind.name(), points));
    }
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(0.001, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("postern-load latency by percentile", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0..X_MAX).log_scale(), 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| format!("{}%", trim(100.0 - 100.0 / x)))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let colours = [BLUE, RED, GREEN, MAGENTA];
    for (i, (name, points)) in series.into_iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

fn trim(p: f64) -> String {
    let s = format!("{p:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

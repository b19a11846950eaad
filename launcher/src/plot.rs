//! PNG plots (plotters' bitmap backend). Text is drawn with a font embedded in the binary
//! (DejaVu Sans Mono, `launcher/assets/fonts`, its licence beside it), registered once, so a
//! plot needs no fontconfig or other system library — the binary stays "builds and starts
//! anywhere".

use crate::coord_check::Report;
use crate::error::{LaunchError, Result};
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded file is a valid TrueType font; a failure would only lose the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err(e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Runtime(format!("plot: {e}"))
}

/// The series' names in a box at `pos`.
fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>,
    pos: SeriesLabelPosition,
    size: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .label_font(("sans-serif", size))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

/// The coordinate check: one panel per step, log2(width) against log2(mean |x|), one line per
/// module (failing modules drawn thick).
pub fn coord_check_png(r: &Report, path: &Path) -> Result<()> {
    register_font();
    let steps = r.steps as usize;
    let root = BitMapBackend::new(path, (420 * steps as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, steps));
    let lx: Vec<f64> = r.widths.iter().map(|&w| (w as f64).log2()).collect();
    let (x0, x1) = (lx[0] - 0.2, lx[lx.len() - 1] + 0.2);
    for (t, panel) in panels.iter().enumerate() {
        let ys: Vec<f64> = r.modules.values().flat_map(|c| c.mean_abs[t].iter().filter(|v| **v > 0.0).map(|v| v.log2())).collect();
        let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
        let (lo, hi) = if lo.is_finite() { (lo - 0.5, hi + 0.5) } else { (-1.0, 1.0) };
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("t = {}", t + 1), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(44)
            .build_cartesian_2d(x0..x1, lo..hi)
            .map_err(err)?;
        chart.configure_mesh().x_desc("log2 width").y_desc("log2 mean |x|").label_style(("sans-serif", 12)).draw().map_err(err)?;
        for (i, (name, c)) in r.modules.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let failing = r.failures.iter().any(|(m, s, _)| m == name && *s as usize == t + 1);
            let pts: Vec<(f64, f64)> = lx.iter().zip(&c.mean_abs[t]).filter(|(_, v)| **v > 0.0).map(|(x, v)| (*x, v.log2())).collect();
            let style = ShapeStyle { color, filled: false, stroke_width: if failing { 3 } else { 1 } };
            let line = chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(err)?;
            if t + 1 == steps {
                line.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(3)));
            }
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(err)?;
        }
        if t + 1 == steps {
            legend(&mut chart, SeriesLabelPosition::UpperLeft, 10)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A line chart of named series over steps (`log_y`: the y axis is log10 of the values, for
/// quantities that span decades; non-positive points are then left out).
pub fn line_chart(path: &Path, title: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)], log_y: bool) -> Result<()> {
    chart_xy(path, title, "step", y_desc, series, log_y)
}

/// A line chart of named (x, y) series with the given axis names.
pub fn chart_xy(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)], log_y: bool) -> Result<()> {
    register_font();
    let tr = |v: f64| if log_y { v.log10() } else { v };
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, s)| s.iter().filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0)).map(|&(x, y)| (x, tr(y))).collect())
        .collect();
    let all = pts.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(err)?;
    let y_desc = if log_y { format!("log10 {y_desc}") } else { y_desc.to_string() };
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).label_style(("sans-serif", 12)).draw().map_err(err)?;
    for (i, ((name, _), p)) in series.iter().zip(&pts).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.clone(), ShapeStyle { color, filled: false, stroke_width: 2 }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(3)));
        if p.len() < 30 {
            chart.draw_series(p.iter().map(|&q| Circle::new(q, 3, color.filled()))).map_err(err)?;
        }
    }
    if series.len() > 1 {
        legend(&mut chart, SeriesLabelPosition::UpperRight, 12)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

//! `frontier.svg`: fluency (judge NLL, lower is better) against diversity (distinct-2 across
//! a prompt's samples): the plain baselines as a curve, dream settings as labelled points.

use crate::report::Figures;
use plotters::prelude::*;
use std::path::Path;

pub fn frontier(figures: &[Figures], title: &str, path: &Path) -> anyhow::Result<()> {
    let ok: Vec<&Figures> = figures
        .iter()
        .filter(|f| f.judge_nll.is_finite() && f.distinct_2_across.is_finite())
        .collect();
    anyhow::ensure!(!ok.is_empty(), "no setting has figures to plot");
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for f in &ok {
        x0 = x0.min(f.distinct_2_across);
        x1 = x1.max(f.distinct_2_across);
        y0 = y0.min(f.judge_nll);
        y1 = y1.max(f.judge_nll);
    }
    let pad = |a: f64, b: f64| ((b - a) * 0.15).max(0.02);
    let (px, py) = (pad(x0, x1), pad(y0, y1));
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))?;
    chart
        .configure_mesh()
        .x_desc("diversity: distinct-2 across samples (higher is more varied)")
        .y_desc("judge NLL, nats/token (lower is more fluent)")
        .draw()?;
    let mut plain: Vec<&&Figures> = ok.iter().filter(|f| f.plain).collect();
    plain.sort_by(|a, b| a.distinct_2_across.total_cmp(&b.distinct_2_across));
    chart
        .draw_series(LineSeries::new(
            plain.iter().map(|f| (f.distinct_2_across, f.judge_nll)),
            BLUE.stroke_width(2),
        ))?
        .label("plain sampling")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    for f in &ok {
        let color = if f.plain { BLUE } else { RED };
        let marker = if f.pareto { 6 } else { 4 };
        chart.draw_series(std::iter::once(Circle::new(
            (f.distinct_2_across, f.judge_nll),
            marker,
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{}{}", f.name, if f.pareto { " *" } else { "" }),
            (f.distinct_2_across, f.judge_nll),
            ("sans-serif", 12).into_font().color(&color),
        )))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

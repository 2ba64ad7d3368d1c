//! A hand-written SVG of the latency distributions: one panel per queue depth, one percentile
//! curve per flush mode (HdrHistogram style: the x axis stretches the tail, 90%, 99%, 99.9%
//! ..., the y axis is latency on a log scale), and the raw-fdatasync baseline in every panel.
//! Also a plain line plot of one figure against a count, for the many-daemons comparison.

use std::fmt::Write as _;

/// One curve: a name, a colour, a dash pattern, and sorted latencies in nanoseconds.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub dashed: bool,
    pub sorted_ns: &'a [u64],
}

pub struct Panel<'a> {
    pub title: String,
    /// A smaller line under the title, for figures the curves do not show; may be empty.
    pub note: String,
    pub series: Vec<Series<'a>>,
}

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 62.0;
const MARGIN_R: f64 = 24.0;
const MARGIN_T: f64 = 40.0;
const MARGIN_B: f64 = 42.0;
const TOP: f64 = 56.0;
const LEGEND_H: f64 = 30.0;
/// Points per curve: enough for smooth lines, few enough for a small file.
const POINTS: usize = 240;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// x position of quantile `q` on the "nines" axis: log10(1 / (1 - q)).
fn nines(q: f64) -> f64 {
    (1.0 / (1.0 - q).max(1e-9)).log10()
}

/// Renders `panels` in a grid of `columns`, under `title`.
pub fn render(title: &str, subtitle: &str, panels: &[Panel], columns: usize) -> String {
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns);
    let width = PANEL_W * columns as f64;
    let height = TOP + LEGEND_H + PANEL_H * rows as f64 + 8.0;

    // Shared axes across panels so that they compare at a glance.
    let all = panels
        .iter()
        .flat_map(|p| p.series.iter())
        .filter(|s| !s.sorted_ns.is_empty());
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    let mut max_n = 2usize;
    for s in all {
        lo = lo.min(s.sorted_ns[0].max(1) as f64 / 1000.0);
        hi = hi.max(s.sorted_ns[s.sorted_ns.len() - 1] as f64 / 1000.0);
        max_n = max_n.max(s.sorted_ns.len());
    }
    if hi <= 0.0 {
        lo = 1.0;
        hi = 10.0;
    }
    let y_lo_exp = lo.max(0.1).log10().floor() as i32;
    let y_hi_exp = (hi.log10().ceil() as i32).max(y_lo_exp + 1);
    let (y_lo, y_hi) = (10f64.powi(y_lo_exp), 10f64.powi(y_hi_exp));
    // The tail shown goes as far as the largest sample set resolves: 1 - 1/n.
    let x_max = nines(1.0 - 1.0 / max_n as f64).ceil().max(1.0);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" font-size="15" text-anchor="middle" font-weight="bold">{}</text><text x="{}" y="38" text-anchor="middle" fill="#444">{}</text>"##,
        width / 2.0,
        esc(title),
        width / 2.0,
        esc(subtitle)
    );

    // Legend, from the first panel's series.
    if let Some(first) = panels.first() {
        let mut x = 20.0;
        let y = TOP + 12.0;
        for s in &first.series {
            let _ = writeln!(
                svg,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2.5"{}/><text x="{}" y="{}">{}</text>"#,
                x + 24.0,
                s.color,
                if s.dashed {
                    r#" stroke-dasharray="5,3""#
                } else {
                    ""
                },
                x + 30.0,
                y + 4.0,
                esc(s.name)
            );
            x += 40.0 + 7.0 * s.name.len() as f64;
        }
    }

    for (i, panel) in panels.iter().enumerate() {
        let ox = PANEL_W * (i % columns) as f64;
        let oy = TOP + LEGEND_H + PANEL_H * (i / columns) as f64;
        let (px, py) = (ox + MARGIN_L, oy + MARGIN_T);
        let pw = PANEL_W - MARGIN_L - MARGIN_R;
        let ph = PANEL_H - MARGIN_T - MARGIN_B;
        let sx = |x: f64| px + pw * (x / x_max).clamp(0.0, 1.0);
        let sy = |us: f64| {
            let f = (us.max(y_lo).log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10());
            py + ph * (1.0 - f.clamp(0.0, 1.0))
        };
        let _ = writeln!(
            svg,
            r##"<g><text x="{}" y="{}" font-size="13" text-anchor="middle" font-weight="bold">{}</text><text x="{}" y="{}" font-size="10" text-anchor="middle" fill="#444">{}</text><rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##,
            px + pw / 2.0,
            oy + 18.0,
            esc(&panel.title),
            px + pw / 2.0,
            oy + 32.0,
            esc(&panel.note)
        );
        // y grid: decades, with 2x and 5x minor lines.
        for e in y_lo_exp..=y_hi_exp {
            let decade = 10f64.powi(e);
            let y = sy(decade);
            let label = match e {
                e if e >= 3 => format!("{} ms", 10u64.pow((e - 3) as u32)),
                e if e >= 0 => format!("{} us", 10u64.pow(e as u32)),
                e => format!("{decade:.*} us", (-e) as usize),
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{px}" y1="{y}" x2="{}" y2="{y}" stroke="#ccc"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                px + pw,
                px - 5.0,
                y + 4.0
            );
            for m in [2.0, 5.0] {
                let v = decade * m;
                if v < y_hi {
                    let y = sy(v);
                    let _ = writeln!(
                        svg,
                        r##"<line x1="{px}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/>"##,
                        px + pw
                    );
                }
            }
        }
        // x grid: 0%, 90%, 99%, 99.9%, ...
        for k in 0..=(x_max as usize) {
            let x = sx(k as f64);
            let label = match k {
                0 => "0%".to_string(),
                // 90%, 99%, 99.9%: k nines.
                k => format!(
                    "{:.*}%",
                    k.saturating_sub(2),
                    100.0 - 100.0 / 10f64.powi(k as i32)
                ),
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{x}" y1="{py}" x2="{x}" y2="{}" stroke="#ccc"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
                py + ph,
                py + ph + 14.0
            );
        }
        // The median, where most readers look first.
        let x50 = sx(nines(0.5));
        let _ = writeln!(
            svg,
            r##"<line x1="{x50}" y1="{py}" x2="{x50}" y2="{}" stroke="#eee"/><text x="{x50}" y="{}" text-anchor="middle" fill="#666">50%</text>"##,
            py + ph,
            py + ph + 14.0
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">percentile</text>"##,
            px + pw / 2.0,
            py + ph + 30.0
        );
        for s in &panel.series {
            if s.sorted_ns.is_empty() {
                continue;
            }
            let n = s.sorted_ns.len();
            let mut pts = String::new();
            let top = nines(1.0 - 1.0 / n as f64);
            for j in 0..=POINTS {
                let x = top * j as f64 / POINTS as f64;
                let q = 1.0 - 10f64.powf(-x);
                let idx = ((q * n as f64) as usize).min(n - 1);
                let _ = write!(
                    pts,
                    "{:.1},{:.1} ",
                    sx(x),
                    sy(s.sorted_ns[idx] as f64 / 1000.0)
                );
            }
            // The maximum, at the end of the curve.
            let _ = write!(
                pts,
                "{:.1},{:.1}",
                sx(top),
                sy(s.sorted_ns[n - 1] as f64 / 1000.0)
            );
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2"{} points="{pts}"/>"#,
                s.color,
                if s.dashed {
                    r#" stroke-dasharray="5,3""#
                } else {
                    ""
                }
            );
        }
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n");
    svg
}

/// One line of a [`render_lines`] plot: a value per x label, and an optional note printed
/// above each point.
pub struct Line<'a> {
    pub name: String,
    pub color: &'a str,
    pub dashed: bool,
    pub values: Vec<f64>,
    pub notes: Vec<String>,
}

/// A line plot of `lines` over evenly spaced `labels` (counts such as 1, 4, 16), with the y
/// axis linear from 0 so that totals compare by height.
pub fn render_lines(
    title: &str,
    subtitle: &str,
    x_title: &str,
    y_title: &str,
    labels: &[String],
    lines: &[Line],
) -> String {
    let (width, height) = (760.0, 420.0);
    let (px, py) = (MARGIN_L + 14.0, TOP + LEGEND_H + 10.0);
    let (pw, ph) = (width - px - MARGIN_R, height - py - MARGIN_B - 8.0);
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().copied())
        .fold(0.0, f64::max);
    // A round step (1, 2 or 5 times a power of ten) giving 4 to 10 grid lines.
    let raw_step = (top / 5.0).max(1.0);
    let mag = 10f64.powf(raw_step.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| top / s <= 8.0)
        .unwrap_or(10.0 * mag);
    let y_max = ((top / step).floor() + 1.0) * step;
    let n = labels.len().max(1);
    let sx = |i: usize| px + pw * (i as f64 + 0.5) / n as f64;
    let sy = |v: f64| py + ph * (1.0 - (v / y_max).clamp(0.0, 1.0));

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" font-size="14" text-anchor="middle" font-weight="bold">{}</text><text x="{}" y="38" text-anchor="middle" fill="#444">{}</text>"##,
        width / 2.0,
        esc(title),
        width / 2.0,
        esc(subtitle)
    );
    let mut x = 20.0;
    for l in lines {
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="2.5"{}/><text x="{}" y="{}">{}</text>"#,
            TOP + 12.0,
            x + 24.0,
            TOP + 12.0,
            l.color,
            if l.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            },
            x + 30.0,
            TOP + 16.0,
            esc(&l.name)
        );
        x += 40.0 + 6.5 * l.name.len() as f64;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = sy(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{px}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            px + pw,
            px - 5.0,
            y + 4.0
        );
        v += step;
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            sx(i),
            py + ph + 15.0,
            esc(label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text><text x="16" y="{}" text-anchor="middle" fill="#444" transform="rotate(-90 16 {})">{}</text>"##,
        px + pw / 2.0,
        py + ph + 32.0,
        esc(x_title),
        py + ph / 2.0,
        py + ph / 2.0,
        esc(y_title)
    );
    for l in lines {
        let pts: Vec<String> = l
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", sx(i), sy(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>"#,
            l.color,
            if l.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            },
            pts.join(" ")
        );
        for (i, &v) in l.values.iter().enumerate() {
            let (cx, cy) = (sx(i), sy(v));
            let _ = writeln!(
                svg,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{}"/>"#,
                l.color
            );
            if let Some(note) = l.notes.get(i) {
                // Below the point when another line passes above it, so as not to sit on it.
                let above_others = lines
                    .iter()
                    .all(|o| o.values.get(i).is_none_or(|&ov| ov <= v));
                let _ = writeln!(
                    svg,
                    r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="{}">{}</text>"#,
                    if above_others { cy - 9.0 } else { cy + 18.0 },
                    l.color,
                    esc(note)
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_panel_per_depth_and_a_curve_per_series() {
        let a: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let b: Vec<u64> = (1..=1000).map(|i| 50_000 + i * 10).collect();
        let panels = vec![
            Panel {
                note: "CPU us per flush: group 40 & raw 80".into(),
                title: "depth 1".into(),
                series: vec![
                    Series {
                        name: "group",
                        color: "#1f77b4",
                        dashed: false,
                        sorted_ns: &a,
                    },
                    Series {
                        name: "raw <fdatasync>",
                        color: "#555",
                        dashed: true,
                        sorted_ns: &b,
                    },
                ],
            },
            Panel {
                note: String::new(),
                title: "depth 4".into(),
                series: vec![],
            },
        ];
        let svg = render("t", "s", &panels, 2);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("raw &lt;fdatasync&gt;"));
        assert!(svg.contains(">CPU us per flush: group 40 &amp; raw 80</text>"));
        assert!(svg.contains("99.9%"), "n=1000 resolves 99.9%");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn line_plot_has_a_point_per_value_and_a_zero_based_axis() {
        let labels = ["1", "4", "16"].map(String::from);
        let lines = [
            Line {
                name: "daemons".into(),
                color: "#1f77b4",
                dashed: false,
                values: vec![2000.0, 5200.0, 6100.0],
                notes: vec!["0.95 x".into(), "0.9 x".into(), "0.8 x".into()],
            },
            Line {
                name: "raw <loops>".into(),
                color: "#555",
                dashed: true,
                values: vec![2100.0, 5800.0, 7600.0],
                notes: Vec::new(),
            },
        ];
        let svg = render_lines("t", "s", "N", "flushes/s", &labels, &lines);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains(">0.95 x<") && svg.contains("raw &lt;loops&gt;"));
        assert!(svg.contains(">0</text>") && svg.contains(">8000</text>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Nothing to plot still gives a valid document.
        assert!(render_lines("t", "s", "N", "y", &[], &[]).ends_with("</svg>\n"));
    }
}

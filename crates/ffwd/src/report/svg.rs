//! Inline SVG charts with no font system and no script: line charts (several series with a
//! legend, optional log axes) and bar charts. Text is emitted as SVG `<text>` for the browser
//! to render. Every series carries its raw values in a `data-points` attribute (`x:y` pairs)
//! so that tests and tools read back exactly what was plotted.

use std::fmt::Write;

/// Series colours (colour-blind-safe Okabe–Ito order).
const PALETTE: [&str; 8] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

const W: f64 = 520.0;
const H: f64 = 290.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 44.0;

/// One named series of (x, y) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points in x order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Palette index (so that a run keeps its colour across charts); `None`: the series'
    /// position in the chart.
    pub colour: Option<usize>,
}

/// A line chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The series.
    pub series: Vec<Series>,
    /// Logarithmic x axis (positive x only).
    pub log_x: bool,
    /// Logarithmic y axis (positive y only).
    pub log_y: bool,
}

/// Escapes text for XML content and attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A number in short form for tick labels.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.4}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// About five "nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..20).map(|i| first + i as f64 * step).take_while(|v| *v <= hi + 1e-9 * step).collect()
}

struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            let v = if log { v.log10() } else { v };
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        if !log {
            let pad = 0.04 * (hi - lo);
            (lo, hi) = (lo - pad, hi + pad);
        }
        Axis { lo, hi, log }
    }

    fn map(&self, v: f64, from: f64, to: f64) -> Option<f64> {
        if !v.is_finite() || (self.log && v <= 0.0) {
            return None;
        }
        let v = if self.log { v.log10() } else { v };
        Some(from + (v - self.lo) / (self.hi - self.lo) * (to - from))
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.floor() as i32, self.hi.ceil() as i32);
            (a..=b).map(|e| 10f64.powi(e)).filter(|v| v.log10() >= self.lo - 1e-9 && v.log10() <= self.hi + 1e-9).collect()
        } else {
            ticks(self.lo, self.hi)
        }
    }
}

fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str, class: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="{class}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}"><rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/><text x="{cx}" y="18" text-anchor="middle" font-family="sans-serif" font-size="14" font-weight="bold">{t}</text><text x="{cx}" y="{xl}" text-anchor="middle" font-family="sans-serif" font-size="12">{x}</text><text x="14" y="{cy}" text-anchor="middle" font-family="sans-serif" font-size="12" transform="rotate(-90 14 {cy})">{y}</text>"##,
        t = escape(title),
        x = escape(x_label),
        y = escape(y_label),
        cx = (LEFT + W - RIGHT) / 2.0,
        cy = (TOP + H - BOTTOM) / 2.0,
        xl = H - 6.0,
    );
}

/// The plot's frame and horizontal grid with the y tick labels; returns its corners
/// (x0, x1, y0 bottom, y1 top).
fn plot_area(out: &mut String, ya: &Axis) -> (f64, f64, f64, f64) {
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    let _ = write!(out, r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#888888"/>"##, x1 - x0, y0 - y1);
    for t in ya.ticks() {
        if let Some(y) = ya.map(t, y0, y1) {
            let _ = write!(
                out,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-family="sans-serif" font-size="10">{}</text>"##,
                x0 - 4.0,
                y + 3.0,
                short(t)
            );
        }
    }
    (x0, x1, y0, y1)
}

impl LineChart {
    /// The chart as one `<svg>` element.
    pub fn to_svg(&self) -> String {
        let mut out = String::new();
        frame(&mut out, &self.title, &self.x_label, &self.y_label, "chart line-chart");
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let xa = Axis::new(all().map(|p| p.0), self.log_x);
        let ya = Axis::new(all().map(|p| p.1), self.log_y);
        let (x0, x1, y0, y1) = plot_area(&mut out, &ya);
        for t in xa.ticks() {
            if let Some(x) = xa.map(t, x0, x1) {
                let _ = write!(
                    out,
                    r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#888888"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-family="sans-serif" font-size="10">{}</text>"##,
                    y0 + 4.0,
                    y0 + 15.0,
                    short(t)
                );
            }
        }
        // legend box first, so that the lines stay visible under it
        let longest = self.series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64;
        let lw = (26.0 + 6.2 * longest).min(x1 - x0);
        let _ = write!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="{lw:.1}" height="{:.1}" fill="#ffffff" fill-opacity="0.8" stroke="#cccccc"/>"##,
            x1 - lw - 4.0,
            y1 + 4.0,
            14.0 * self.series.len() as f64 + 6.0
        );
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[s.colour.unwrap_or(i) % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s.points.iter().filter_map(|&(x, y)| Some((xa.map(x, x0, x1)?, ya.map(y, y0, y1)?))).collect();
            let data: Vec<String> = s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|(x, y)| format!("{x}:{y}")).collect();
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                out,
                r#"<polyline class="series" data-series="{}" data-points="{}" points="{}" fill="none" stroke="{colour}" stroke-width="1.8"/>"#,
                escape(&s.name),
                data.join(" "),
                path.join(" ")
            );
            if pts.len() <= 40 {
                for (x, y) in &pts {
                    let _ = write!(out, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.2" fill="{colour}"/>"#);
                }
            }
            // legend, top right inside the plot
            let ly = y1 + 14.0 + 14.0 * i as f64;
            let _ = write!(
                out,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2.5"/><text x="{:.1}" y="{:.1}" font-family="sans-serif" font-size="11">{}</text>"#,
                x1 - lw,
                x1 - lw + 18.0,
                x1 - lw + 22.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>");
        out
    }
}

/// A bar chart of labelled values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BarChart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Bars: (label, value).
    pub bars: Vec<(String, f64)>,
    /// A horizontal reference line (e.g. the uniform share), if any.
    pub reference: Option<f64>,
}

impl BarChart {
    /// The chart as one `<svg>` element.
    pub fn to_svg(&self) -> String {
        let mut out = String::new();
        frame(&mut out, &self.title, &self.x_label, &self.y_label, "chart bar-chart");
        let ya = Axis::new(self.bars.iter().map(|b| b.1).chain([0.0]).chain(self.reference), false);
        let (x0, x1, y0, y1) = plot_area(&mut out, &ya);
        let n = self.bars.len().max(1) as f64;
        let bw = (x1 - x0) / n;
        let base = ya.map(0.0, y0, y1).unwrap_or(y0);
        let data: Vec<String> = self.bars.iter().map(|(l, v)| format!("{}:{v}", escape(l))).collect();
        let _ = write!(out, r#"<g class="series" data-series="{}" data-points="{}">"#, escape(&self.title), data.join(" "));
        let label_every = (self.bars.len() / 16).max(1);
        for (i, (label, v)) in self.bars.iter().enumerate() {
            let x = x0 + i as f64 * bw;
            let y = ya.map(*v, y0, y1).unwrap_or(base);
            let _ = write!(
                out,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#0072B2"/>"##,
                x + 0.1 * bw,
                y.min(base),
                (0.8 * bw).max(0.5),
                (base - y).abs()
            );
            if i % label_every == 0 {
                let _ = write!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-family="sans-serif" font-size="9">{}</text>"#,
                    x + bw / 2.0,
                    y0 + 12.0,
                    escape(label)
                );
            }
        }
        out.push_str("</g>");
        if let Some(r) = self.reference.and_then(|r| ya.map(r, y0, y1)) {
            let _ = write!(out, r##"<line x1="{x0}" y1="{r:.1}" x2="{x1}" y2="{r:.1}" stroke="#D55E00" stroke-dasharray="4 3"/>"##);
        }
        out.push_str("</svg>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range_and_text_is_escaped() {
        let t = ticks(0.0, 1.0);
        assert!(t.len() >= 3 && t[0] >= 0.0 && *t.last().unwrap() <= 1.0 + 1e-9, "{t:?}");
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        let c = LineChart {
            title: "<t>".into(),
            series: vec![Series { name: "s&1".into(), points: vec![(1.0, 2.0), (2.0, f64::NAN), (3.0, 4.0)], colour: None }],
            ..Default::default()
        };
        let svg = c.to_svg();
        assert!(svg.contains(r#"data-points="1:2 3:4""#) && svg.contains("&lt;t&gt;") && svg.contains("s&amp;1"), "{svg}");
    }
}

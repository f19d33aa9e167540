//! Experiments such as `kiln exp fp8-vs-bf16` compare loss curves (train loss per step, and
//! validation loss at a few steps) and save the comparison as a picture beside their metrics.
//! This module draws it as a standalone SVG, with no dependency: a [`Plot`] holds the curves,
//! and [`Plot::to_svg`] returns the whole document as a string, which the caller writes where
//! it likes.
//!
//! What the picture has: a fixed 800×480 canvas; both axes spanning the data (the y axis with 5%
//! padding) with ticks at "nice" steps (1, 2 or 5 × 10^k) labelled with only the digits the step
//! needs; light grid lines; the title and both axis labels; one colour per series from the
//! Okabe–Ito colour-blind-friendly palette, solid or dashed; and a legend, in whichever corner of
//! the plot area the curves cross least.
//!
//! What it does with awkward data: points with a non-finite coordinate are skipped and break the
//! line there; a run of a single point (a series with one point, say) is drawn as a marker, and
//! so is every point of a sparse series (at most [`MARKED_MAX`] points), such as a validation
//! loss measured a few times; constant data gets a range around its value; a plot without any
//! finite point is still a valid SVG, saying "no data". Text is XML-escaped, so series names may
//! hold anything.
//!
//! The output is deterministic: coordinates are written with one decimal, labels from the tick
//! values and steps alone, and nothing depends on the platform's math library, so a plot can
//! be snapshot-tested.

use std::fmt::Write as _;

/// One curve: its points `(x, y)` in the order they are joined.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The name the legend shows.
    pub name: String,
    /// The points, joined in order; a point with a non-finite coordinate breaks the line.
    pub points: Vec<(f64, f64)>,
    /// Draw the line dashed (for example a validation curve beside a training one).
    pub dashed: bool,
}

/// A line plot: a title, two axis labels, and the curves (each in its own colour, in order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// The canvas size in pixels.
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
/// Space above the plot area (for the title), to its right, and below it (tick labels, x label).
const MARGIN_TOP: f64 = 44.0;
const MARGIN_RIGHT: f64 = 24.0;
const MARGIN_BOTTOM: f64 = 56.0;
/// The y axis is padded by this fraction of the data's range on both sides.
const Y_PADDING: f64 = 0.05;
/// The Okabe–Ito palette (without its yellow, too pale on white), cycled through in order.
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];
/// Series with at most this many finite points get a marker at every point.
pub const MARKED_MAX: usize = 30;
/// Legend entries longer than this many characters are cut, ending in "…".
const LEGEND_MAX_CHARS: usize = 40;
/// Font sizes and a rough average glyph width (a fraction of the size) for sans-serif text,
/// used to size the left margin and the legend box.
const FONT: f64 = 12.0;
const TITLE_FONT: f64 = 16.0;
const GLYPH_WIDTH: f64 = 0.62;

impl Plot {
    /// The plot as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        // Only finite points take part; each series becomes runs of consecutive finite points.
        let runs: Vec<Vec<Vec<(f64, f64)>>> =
            self.series.iter().map(|s| finite_runs(&s.points)).collect();
        let bounds = runs
            .iter()
            .flatten()
            .flatten()
            .fold(None, |b: Option<[f64; 4]>, &(x, y)| {
                Some(match b {
                    None => [x, x, y, y],
                    Some([x0, x1, y0, y1]) => [x0.min(x), x1.max(x), y0.min(y), y1.max(y)],
                })
            });

        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"{FONT}\">",
            w = WIDTH,
            h = HEIGHT,
        );
        let _ = writeln!(
            out,
            "<rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>"
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"{TITLE_FONT}\" \
             font-weight=\"bold\">{}</text>",
            num(WIDTH / 2.0),
            escape(&self.title)
        );

        let (x_axis, y_axis) = match bounds {
            Some([x0, x1, y0, y1]) => {
                let (y0, y1) = widen(y0, y1);
                // Halved first, so that no difference of finite values overflows.
                let pad = (y1 / 2.0 - y0 / 2.0) * (2.0 * Y_PADDING);
                let y_axis = ((y0 - pad).max(f64::MIN), (y1 + pad).min(f64::MAX));
                (Some(widen(x0, x1)), Some(y_axis))
            }
            None => (None, None),
        };
        let y_ticks = y_axis
            .map(|(lo, hi)| nice_ticks(lo, hi, 7))
            .unwrap_or_default();
        // The left margin fits the widest y tick label, the tick marks and the rotated y label.
        let widest = y_ticks
            .iter()
            .map(|t| t.label.chars().count())
            .max()
            .unwrap_or(0);
        let left = (text_width(widest, FONT) + 40.0).max(56.0).round();
        let area = Rect {
            x0: left,
            y0: MARGIN_TOP,
            x1: WIDTH - MARGIN_RIGHT,
            y1: HEIGHT - MARGIN_BOTTOM,
        };
        let x_ticks = x_axis
            .map(|(lo, hi)| nice_ticks(lo, hi, ((area.x1 - area.x0) / 90.0) as usize))
            .unwrap_or_default();

        // Axis labels.
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            num((area.x0 + area.x1) / 2.0),
            num(HEIGHT - 12.0),
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            "<text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            num((area.y0 + area.y1) / 2.0),
            escape(&self.y_label)
        );

        let project = |(x, y): (f64, f64)| -> (f64, f64) {
            let (Some((x0, x1)), Some((y0, y1))) = (x_axis, y_axis) else {
                return (area.x0, area.y1);
            };
            (
                area.x0 + fraction(x, x0, x1) * (area.x1 - area.x0),
                area.y1 - fraction(y, y0, y1) * (area.y1 - area.y0),
            )
        };

        // Grid lines and tick labels.
        out.push_str("<g stroke=\"#e6e6e6\" stroke-width=\"1\">\n");
        for t in &x_ticks {
            let (x, _) = project((t.value, 0.0));
            let _ = writeln!(
                out,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>",
                num(area.y0),
                num(area.y1),
                x = num(x)
            );
        }
        for t in &y_ticks {
            let (_, y) = project((0.0, t.value));
            let _ = writeln!(
                out,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>",
                num(area.x0),
                num(area.x1),
                y = num(y)
            );
        }
        out.push_str("</g>\n");
        out.push_str("<g stroke=\"#444444\" stroke-width=\"1\">\n");
        for t in &x_ticks {
            let (x, _) = project((t.value, 0.0));
            let _ = writeln!(
                out,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>",
                num(area.y1),
                num(area.y1 + 5.0),
                x = num(x)
            );
        }
        for t in &y_ticks {
            let (_, y) = project((0.0, t.value));
            let _ = writeln!(
                out,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>",
                num(area.x0 - 5.0),
                num(area.x0),
                y = num(y)
            );
        }
        out.push_str("</g>\n");
        out.push_str("<g fill=\"#222222\">\n");
        for t in &x_ticks {
            let (x, _) = project((t.value, 0.0));
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                num(x),
                num(area.y1 + 20.0),
                t.label
            );
        }
        for t in &y_ticks {
            let (_, y) = project((0.0, t.value));
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                num(area.x0 - 8.0),
                num(y + 4.0),
                t.label
            );
        }
        out.push_str("</g>\n");
        // The axes: the left and bottom edges of the plot area.
        let _ = writeln!(
            out,
            "<path d=\"M{} {}V{}H{}\" fill=\"none\" stroke=\"#444444\" stroke-width=\"1\"/>",
            num(area.x0),
            num(area.y0),
            num(area.y1),
            num(area.x1)
        );

        if bounds.is_none() {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"{TITLE_FONT}\" \
                 fill=\"#888888\">no data</text>",
                num((area.x0 + area.x1) / 2.0),
                num((area.y0 + area.y1) / 2.0)
            );
        }

        // The curves, in pixels.
        let drawn: Vec<Vec<Vec<(f64, f64)>>> = runs
            .iter()
            .map(|s| {
                s.iter()
                    .map(|run| run.iter().map(|&p| project(p)).collect())
                    .collect()
            })
            .collect();
        for (i, (series, runs)) in self.series.iter().zip(&drawn).enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let dash = if series.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            let count: usize = runs.iter().map(Vec::len).sum();
            for run in runs.iter().filter(|r| r.len() > 1) {
                let points: Vec<String> = run
                    .iter()
                    .map(|&(x, y)| format!("{},{}", num(x), num(y)))
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" \
                     stroke-width=\"1.5\" stroke-linejoin=\"round\"{dash}/>",
                    points.join(" ")
                );
            }
            for run in runs {
                if run.len() == 1 || count <= MARKED_MAX {
                    for &(x, y) in run {
                        let _ = writeln!(
                            out,
                            "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{colour}\"/>",
                            num(x),
                            num(y)
                        );
                    }
                }
            }
        }

        legend(&mut out, &self.series, &drawn, &area);
        out.push_str("</svg>\n");
        out
    }
}

/// A rectangle in pixels: `x0 <= x1`, `y0 <= y1` (y grows downwards).
#[derive(Clone, Copy, Debug)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

/// Writes the legend into the corner of `area` that the fewest curve segments cross (top right
/// first on a tie, then top left, bottom right, bottom left).
/// Several plots one above the other in one standalone SVG document, each drawn as
/// [`Plot::to_svg`] draws it alone (a nested `<svg>` at its own height).
pub fn stack(plots: &[Plot]) -> String {
    let height = HEIGHT * plots.len().max(1) as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\">\n"
    );
    for (i, plot) in plots.iter().enumerate() {
        let y = HEIGHT * i as f64;
        out.push_str(
            &plot
                .to_svg()
                .replacen("<svg ", &format!("<svg y=\"{y}\" "), 1),
        );
    }
    out.push_str("</svg>\n");
    out
}

fn legend(out: &mut String, series: &[Series], drawn: &[Vec<Vec<(f64, f64)>>], area: &Rect) {
    if series.is_empty() {
        return;
    }
    const ROW: f64 = 18.0;
    const PAD: f64 = 8.0;
    const SAMPLE: f64 = 24.0;
    const INSET: f64 = 10.0;
    let names: Vec<String> = series.iter().map(|s| shorten(&s.name)).collect();
    let widest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let w = (PAD + SAMPLE + 6.0 + text_width(widest, FONT) + PAD).round();
    let h = 2.0 * PAD + ROW * series.len() as f64 - 4.0;
    let (left, right) = (area.x0 + INSET, area.x1 - INSET - w);
    let (top, bottom) = (area.y0 + INSET, area.y1 - INSET - h);
    let corners = [(right, top), (left, top), (right, bottom), (left, bottom)];
    let crossings = |&(x0, y0): &(f64, f64)| -> usize {
        let r = Rect {
            x0,
            y0,
            x1: x0 + w,
            y1: y0 + h,
        };
        drawn
            .iter()
            .flatten()
            .map(|run| match run.as_slice() {
                [p] => usize::from(hits(&r, *p, *p)),
                _ => run.windows(2).filter(|s| hits(&r, s[0], s[1])).count(),
            })
            .sum()
    };
    let mut best = corners[0];
    let mut fewest = crossings(&best);
    for c in &corners[1..] {
        let n = crossings(c);
        if n < fewest {
            (best, fewest) = (*c, n);
        }
    }
    let (x, y) = best;
    let _ = writeln!(
        out,
        "<g transform=\"translate({},{})\">\n<rect width=\"{}\" height=\"{}\" fill=\"white\" \
         fill-opacity=\"0.9\" stroke=\"#cccccc\"/>",
        num(x),
        num(y),
        num(w),
        num(h)
    );
    for (i, (s, name)) in series.iter().zip(&names).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let dash = if s.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let cy = PAD + ROW * i as f64 + 5.0;
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" \
             stroke-width=\"2\"{dash}/>",
            num(PAD),
            num(PAD + SAMPLE),
            y = num(cy)
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" fill=\"#222222\">{}</text>",
            num(PAD + SAMPLE + 6.0),
            num(cy + 4.0),
            escape(name)
        );
    }
    out.push_str("</g>\n");
}

/// Whether the segment from `a` to `b` meets the rectangle (Liang–Barsky clipping).
fn hits(r: &Rect, a: (f64, f64), b: (f64, f64)) -> bool {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0_f64, 1.0_f64);
    for (p, q) in [
        (-dx, a.0 - r.x0),
        (dx, r.x1 - a.0),
        (-dy, a.1 - r.y0),
        (dy, r.y1 - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return false;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
            if t0 > t1 {
                return false;
            }
        }
    }
    true
}

/// Where `v` lies in `lo..=hi`, as a fraction (halving first, so that no difference of finite
/// values overflows).
fn fraction(v: f64, lo: f64, hi: f64) -> f64 {
    (v / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0)
}

/// The runs of consecutive points whose coordinates are both finite.
fn finite_runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|(x, y)| !(x.is_finite() && y.is_finite()))
        .filter(|run| !run.is_empty())
        .map(<[_]>::to_vec)
        .collect()
}

/// A range around `lo..=hi` that is not empty: constant data `v` gets `v ± 10%`, or `±1` near 0
/// (under 10^-300). So does data whose spread is lost in rounding: under 10^-12 of its magnitude,
/// or under 10^-300, where halving (see [`fraction`]) is no longer exact.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo > (lo.abs().max(hi.abs()) * 1e-12).max(1e-300) {
        (lo, hi)
    } else {
        let half = if lo.abs() < 1e-300 {
            1.0
        } else {
            lo.abs() * 0.1
        };
        ((lo - half).max(f64::MIN), (lo + half).min(f64::MAX))
    }
}

/// A tick: its value and its label.
#[derive(Clone, Debug, PartialEq)]
struct Tick {
    value: f64,
    label: String,
}

/// Ticks inside `lo..=hi` at a step of 1, 2 or 5 × 10^k chosen to give about `target` of them,
/// labelled with the decimals that step needs (in exponent form for very large or small
/// values). An empty range is widened first (see [`widen`]); a non-finite one has no ticks.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<Tick> {
    if !(lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let (lo, hi) = widen(lo, hi);
    let range = hi - lo;
    if !range.is_finite() {
        return Vec::new();
    }
    // The raw step's decimal mantissa and exponent, from Rust's own formatting (exact and the
    // same on every platform, unlike `log10`).
    let (mantissa, mut exp) = decimal_parts(range / target.max(1) as f64);
    let nice: i64 = match mantissa {
        m if m < 1.5 => 1,
        m if m < 3.0 => 2,
        m if m < 7.0 => 5,
        _ => {
            exp += 1;
            1
        }
    };
    let step = scaled(nice, exp);
    if step == 0.0 || !step.is_finite() {
        return Vec::new();
    }
    // Tick i is at i × step, computed as the decimal (i × nice)e(exp) so that, e.g., 0.3 is the
    // double nearest to 0.3, not 3 × 0.1.
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    // Past 10^15 steps from 0, ticks are no longer exact in a double.
    if !(first.abs().max(last.abs()) < 1e15 && last - first < 1000.0) {
        return Vec::new();
    }
    let magnitude = lo.abs().max(hi.abs());
    let exponent_form = !(1e-4..1e6).contains(&magnitude);
    (first as i64..=last as i64)
        .map(|i| {
            let value = scaled(i * nice, exp);
            let label = if i == 0 {
                "0".to_string()
            } else if exponent_form {
                // As many mantissa digits as the step needs at this value's magnitude.
                let (_, e) = decimal_parts(value.abs());
                format!("{:.*e}", (e - exp).max(0) as usize, value)
            } else {
                format!("{:.*}", (-exp).max(0) as usize, value)
            };
            Tick { value, label }
        })
        .collect()
}

/// `n × 10^exp` as the double nearest to that decimal (parsed, so exact for any exponent, and
/// the same on every platform).
fn scaled(n: i64, exp: i32) -> f64 {
    format!("{n}e{exp}").parse().unwrap_or(f64::NAN)
}

/// The decimal mantissa (in `[1, 10)`) and exponent of a positive finite `v`.
fn decimal_parts(v: f64) -> (f64, i32) {
    let s = format!("{v:e}");
    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
    (m.parse().unwrap_or(1.0), e.parse().unwrap_or(0))
}

/// A pixel coordinate with one decimal (never "-0.0").
fn num(v: f64) -> String {
    let r = (v * 10.0).round() / 10.0;
    format!("{:.1}", r + 0.0)
}

/// The rough width in pixels of `chars` characters of sans-serif text at `size`.
fn text_width(chars: usize, size: f64) -> f64 {
    chars as f64 * size * GLYPH_WIDTH
}

/// A legend entry: the name, cut to [`LEGEND_MAX_CHARS`] characters.
fn shorten(name: &str) -> String {
    if name.chars().count() <= LEGEND_MAX_CHARS {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(LEGEND_MAX_CHARS - 1).collect();
        s.push('…');
        s
    }
}

/// `text` for an XML text node or attribute: markup characters as entities, and the control
/// characters XML 1.0 forbids as U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(lo: f64, hi: f64, target: usize) -> Vec<f64> {
        nice_ticks(lo, hi, target)
            .into_iter()
            .map(|t| t.value)
            .collect()
    }

    fn labels(lo: f64, hi: f64, target: usize) -> Vec<String> {
        nice_ticks(lo, hi, target)
            .into_iter()
            .map(|t| t.label)
            .collect()
    }

    #[test]
    fn ticks_of_ordinary_ranges() {
        assert_eq!(values(0.0, 1.0, 5), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(
            labels(0.0, 1.0, 5),
            ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        // Steps of 0.1: no 0.30000000000000004 in values or labels.
        assert_eq!(values(0.05, 0.45, 4), [0.1, 0.2, 0.3, 0.4]);
        assert_eq!(labels(0.05, 0.45, 4), ["0.1", "0.2", "0.3", "0.4"]);
        // Training steps.
        assert_eq!(
            values(0.0, 299.0, 7),
            [0.0, 50.0, 100.0, 150.0, 200.0, 250.0]
        );
        assert_eq!(
            labels(0.0, 299.0, 7),
            ["0", "50", "100", "150", "200", "250"]
        );
        assert_eq!(
            labels(1.0, 20_000.0, 4),
            ["5000", "10000", "15000", "20000"]
        );
        // A loss curve.
        assert_eq!(
            labels(2.1, 5.6, 7),
            ["2.5", "3.0", "3.5", "4.0", "4.5", "5.0", "5.5"]
        );
        // Ends that are ticks are kept despite rounding.
        assert_eq!(values(0.3, 0.9, 3), [0.4, 0.6, 0.8]);
        assert_eq!(values(0.1, 0.7, 6), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
    }

    #[test]
    fn ticks_of_negative_ranges() {
        assert_eq!(values(-1.0, 1.0, 4), [-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(labels(-1.0, 1.0, 4), ["-1.0", "-0.5", "0", "0.5", "1.0"]);
        assert_eq!(values(-7.3, -2.1, 5), [-7.0, -6.0, -5.0, -4.0, -3.0]);
        assert_eq!(
            labels(-0.031, -0.012, 4),
            ["-0.030", "-0.025", "-0.020", "-0.015"]
        );
    }

    #[test]
    fn ticks_of_tiny_and_huge_ranges() {
        assert_eq!(labels(0.0, 3e-5, 3), ["0", "1e-5", "2e-5", "3e-5"]);
        assert_eq!(
            labels(1.0, 1.0 + 4e-6, 4),
            ["1.000000", "1.000001", "1.000002", "1.000003", "1.000004"]
        );
        assert_eq!(labels(0.0015, 0.0042, 3), ["0.002", "0.003", "0.004"]);
        assert_eq!(
            labels(0.0, 2.5e6, 5),
            ["0", "5e5", "1.0e6", "1.5e6", "2.0e6", "2.5e6"]
        );
        assert_eq!(values(1e-300, 3e-300, 2), [1e-300, 2e-300, 3e-300]);
        // Every label is distinct, however narrow the range.
        for (lo, hi) in [
            (1.0, 1.0 + 1e-12),
            (1e9, 1e9 + 3.0),
            (-5e-7, 5e-7),
            (123.4, 123.5),
        ] {
            let l = labels(lo, hi, 5);
            assert!(l.len() >= 2, "{lo}..{hi}: {l:?}");
            let mut d = l.clone();
            d.dedup();
            assert_eq!(d, l, "{lo}..{hi}");
        }
    }

    #[test]
    fn ticks_of_empty_and_bad_ranges() {
        // min == max: a range around the value.
        assert_eq!(values(3.0, 3.0, 4), [2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3]);
        assert_eq!(values(0.0, 0.0, 4), [-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(values(-2e-9, -2e-9, 2), [-2.2e-9, -2e-9, -1.8e-9]);
        assert!(values(0.0, f64::INFINITY, 5).is_empty());
        assert!(values(f64::NAN, 1.0, 5).is_empty());
        assert!(values(-f64::MAX, f64::MAX, 5).is_empty());
        assert_eq!(values(0.0, 10.0, 0), [0.0, 10.0]);
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape("a<b> & \"c\" 'd'"),
            "a&lt;b&gt; &amp; &quot;c&quot; &apos;d&apos;"
        );
        assert_eq!(escape("fp8 \u{1}x\u{FFFF}"), "fp8 \u{FFFD}x\u{FFFD}");
        assert_eq!(escape("λ → ∞"), "λ → ∞");
        let plot = Plot {
            title: "</svg><script>".into(),
            x_label: "a & b".into(),
            y_label: "\"y\"".into(),
            series: vec![series(
                "<fp8> & 'bf16'\u{7}",
                &[(0.0, 1.0), (1.0, 2.0)],
                false,
            )],
        };
        let svg = plot.to_svg();
        let doc = parse(&svg);
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for t in ["</svg><script>", "a & b", "\"y\"", "<fp8> & 'bf16'\u{FFFD}"] {
            assert!(texts.contains(&t), "{t:?} not among {texts:?}");
        }
    }

    #[test]
    fn non_finite_points_split_the_line() {
        let plot = Plot {
            series: vec![series(
                "loss",
                &[
                    (0.0, 4.0),
                    (1.0, 3.0),
                    (2.0, f64::NAN),
                    (3.0, 2.5),
                    (f64::INFINITY, 2.0),
                    (5.0, 2.2),
                    (6.0, 2.0),
                    (7.0, f64::MAX * 2.0),
                ],
                false,
            )],
            ..Plot::default()
        };
        assert_eq!(
            finite_runs(&plot.series[0].points),
            [
                vec![(0.0, 4.0), (1.0, 3.0)],
                vec![(3.0, 2.5)],
                vec![(5.0, 2.2), (6.0, 2.0)]
            ]
        );
        let svg = plot.to_svg();
        let doc = parse(&svg);
        let lines: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l.attribute("points").unwrap().split(' ').count(), 2);
        }
        // The lone point (3, 2.5) has a marker; with 5 points, so do all the others.
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("circle"))
                .count(),
            5
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn one_point_draws_a_marker() {
        let plot = Plot {
            series: vec![series("val", &[(100.0, 2.5)], true)],
            ..Plot::default()
        };
        let svg = plot.to_svg();
        let doc = parse(&svg);
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("polyline"))
                .count(),
            0
        );
        let circles: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("circle"))
            .collect();
        assert_eq!(circles.len(), 1);
        // Constant data is centred: the point sits in the middle of the plot area.
        let cx: f64 = circles[0].attribute("cx").unwrap().parse().unwrap();
        let cy: f64 = circles[0].attribute("cy").unwrap().parse().unwrap();
        assert!(
            (cy - (MARGIN_TOP + HEIGHT - MARGIN_BOTTOM) / 2.0).abs() < 0.1,
            "{cy}"
        );
        assert!(cx > 100.0 && cx < WIDTH - 100.0, "{cx}");
    }

    #[test]
    fn empty_plots_say_no_data() {
        let empty = Plot {
            title: "nothing".into(),
            ..Plot::default()
        };
        let nan = Plot {
            series: vec![
                series("a", &[], false),
                series("b", &[(f64::NAN, 1.0), (2.0, f64::NEG_INFINITY)], true),
            ],
            ..Plot::default()
        };
        for plot in [empty, nan] {
            let svg = plot.to_svg();
            let doc = parse(&svg);
            assert!(
                doc.descendants().any(|n| n.text() == Some("no data")),
                "{svg}"
            );
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            assert_eq!(
                doc.descendants()
                    .filter(|n| n.has_tag_name("polyline"))
                    .count(),
                0
            );
        }
    }

    #[test]
    fn constant_data_does_not_divide_by_zero() {
        let plot = Plot {
            series: vec![series("flat", &[(5.0, 0.0), (5.0, 0.0), (5.0, 0.0)], false)],
            ..Plot::default()
        };
        let svg = plot.to_svg();
        parse(&svg);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn extreme_values_stay_finite() {
        for points in [
            vec![(-f64::MAX, -f64::MAX), (f64::MAX, f64::MAX)],
            vec![(f64::MAX, -f64::MAX), (f64::MAX, -f64::MAX)],
            vec![(0.0, f64::MIN_POSITIVE), (5e-324, 1e-300)],
            vec![(1.0, 1.0), (1.0 + f64::EPSILON, 1.0 + f64::EPSILON)],
        ] {
            let plot = Plot {
                series: vec![series("x", &points, false)],
                ..Plot::default()
            };
            let svg = plot.to_svg();
            parse(&svg);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }

    #[test]
    fn output_is_deterministic() {
        let plot = Plot {
            series: vec![
                series("a", &curve(500, 0.0), false),
                series("b", &curve(500, 0.1), true),
            ],
            ..Plot::default()
        };
        let svg = plot.to_svg();
        assert_eq!(svg, plot.clone().to_svg());
        // Coordinates have one decimal.
        let doc = parse(&svg);
        let line = doc
            .descendants()
            .find(|n| n.has_tag_name("polyline"))
            .unwrap();
        for xy in line.attribute("points").unwrap().split([' ', ',']) {
            let (_, decimals) = xy.split_once('.').unwrap();
            assert_eq!(decimals.len(), 1, "{xy}");
        }
    }

    #[test]
    fn legend_avoids_the_curves() {
        // A rising curve fills the top right corner; the legend goes top left.
        let rising: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, (i as f64).sqrt())).collect();
        let plot = Plot {
            series: vec![series("up", &rising, false)],
            ..Plot::default()
        };
        let svg = plot.to_svg();
        let doc = parse(&svg);
        let legend = doc
            .descendants()
            .find(|n| n.has_tag_name("g") && n.attribute("transform").is_some())
            .unwrap();
        let t = legend.attribute("transform").unwrap();
        let x: f64 = t["translate(".len()..t.find(',').unwrap()].parse().unwrap();
        assert!(x < WIDTH / 2.0, "{t}");
    }

    #[test]
    fn svg_is_well_formed_with_every_series_drawn() {
        let names = [
            "fp8 train",
            "bf16 train",
            "fp8 val",
            "bf16 val",
            "e",
            "f",
            "g",
            "h",
        ];
        let plot = Plot {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: names
                .iter()
                .enumerate()
                .map(|(i, n)| series(n, &curve(200, i as f64 * 0.05), i % 2 == 1))
                .collect(),
        };
        let svg = plot.to_svg();
        let doc = parse(&svg);
        let root = doc.root_element();
        assert!(root.has_tag_name(("http://www.w3.org/2000/svg", "svg")));
        assert_eq!(root.attribute("width"), Some("800"));
        let lines: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        assert_eq!(lines.len(), names.len());
        // Colours cycle through the palette; dashes follow the series.
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l.attribute("stroke"), Some(PALETTE[i % PALETTE.len()]));
            assert_eq!(l.attribute("stroke-dasharray").is_some(), i % 2 == 1);
        }
        for n in names {
            assert!(doc.descendants().any(|t| t.text() == Some(n)), "{n}");
        }
    }

    #[test]
    fn snapshot_of_two_series() {
        // 41 train points (a line, no markers) and 3 validation points (dashed, with markers).
        let train: Vec<(f64, f64)> = (0..=40)
            .map(|i| (i as f64 * 5.0, 4.0 * (-(i as f64) / 12.0).exp() + 1.5))
            .collect();
        let plot = Plot {
            title: "FP8 vs BF16".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                series("bf16 train", &train, false),
                series("fp8 val", &[(0.0, 5.6), (100.0, 1.9), (200.0, 1.75)], true),
            ],
        };
        insta::assert_snapshot!("plot-two-series", plot.to_svg());
    }

    #[test]
    fn stacked_plots_are_one_document_with_each_plot_at_its_height() {
        let plot = |title: &str| Plot {
            title: title.into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![series("a", &curve(5, 0.0), false)],
        };
        let svg = stack(&[plot("first"), plot("second")]);
        let doc = parse(&svg);
        let root = doc.root_element();
        assert_eq!(root.attribute("height"), Some(&*(2.0 * HEIGHT).to_string()));
        let inner: Vec<_> = root.children().filter(|n| n.has_tag_name("svg")).collect();
        assert_eq!(inner.len(), 2);
        assert_eq!(inner[0].attribute("y"), Some("0"));
        assert_eq!(inner[1].attribute("y"), Some(&*HEIGHT.to_string()));
        assert!(svg.contains("first") && svg.contains("second"));
    }

    fn series(name: &str, points: &[(f64, f64)], dashed: bool) -> Series {
        Series {
            name: name.into(),
            points: points.to_vec(),
            dashed,
        }
    }

    /// A decaying, wobbling loss curve of `n` steps.
    fn curve(n: usize, offset: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let t = i as f64;
                (
                    t,
                    3.0 * (-t / 80.0).exp() + 2.0 + offset + 0.05 * (t * 0.7).sin(),
                )
            })
            .collect()
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}\n{svg}"))
    }
}

//! Pictures of what the engine's logit lens and inspection compute: self-contained HTML pages (no
//! network, no scripts from elsewhere), SVG for papers, PNG through resvg. Plotting lives here, in
//! the command line, so that the engine carries no font or rasteriser dependencies.
//!
//! The logit-lens heatmap follows transformer-utils' `plot_logit_lens`: rows are layers (the output
//! on top), columns are input positions, each cell shows the row's top token and is coloured by the
//! chosen metric; cells whose top token is the actual next input token are outlined.

use std::fmt::Write;

use layerwise::analysis::lens::Lens;

/// What colours a lens cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LensMetric {
    /// The logit the row gives the model's own top token.
    Logits,
    /// The probability the row gives the model's own top token.
    Probs,
    /// The rank (1 = top) of the model's own top token in the row, on a log scale.
    Ranks,
    /// KL(final ‖ row).
    Kl,
}

impl LensMetric {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "logits" => Some(LensMetric::Logits),
            "probs" => Some(LensMetric::Probs),
            "ranks" => Some(LensMetric::Ranks),
            "kl" => Some(LensMetric::Kl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LensMetric::Logits => "logits",
            LensMetric::Probs => "probs",
            LensMetric::Ranks => "ranks",
            LensMetric::Kl => "kl",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LensMetric::Logits => "logit of the output's top token",
            LensMetric::Probs => "probability of the output's top token",
            LensMetric::Ranks => "rank of the output's top token (log scale)",
            LensMetric::Kl => "KL(output ‖ layer), nats",
        }
    }

    /// `[rows][positions]` values of this metric.
    fn values(self, lens: &Lens) -> Vec<Vec<f32>> {
        match self {
            LensMetric::Logits => lens.final_top_logit.clone(),
            LensMetric::Probs => lens.final_top_prob.clone(),
            LensMetric::Ranks => lens.final_top_rank.iter().map(|r| r.iter().map(|&x| x as f32).collect()).collect(),
            LensMetric::Kl => lens.kl_to_final.clone(),
        }
    }

    /// Maps each value to [0, 1], 1 being closest to the model's output.
    fn scale(self, values: &[Vec<f32>]) -> (Vec<Vec<f32>>, f32, f32) {
        let flat = values.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = flat.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let unit = |v: f32| -> f32 {
            let t = match self {
                LensMetric::Logits | LensMetric::Probs => (v - lo) / (hi - lo),
                LensMetric::Kl => 1.0 - (v - lo) / (hi - lo),
                LensMetric::Ranks => 1.0 - v.max(1.0).ln() / hi.max(2.0).ln(),
            };
            if t.is_finite() {
                t.clamp(0.0, 1.0)
            } else {
                1.0
            }
        };
        (values.iter().map(|row| row.iter().map(|&v| unit(v)).collect()).collect(), lo, hi)
    }
}

/// Viridis at five stops, interpolated.
fn colour(t: f32) -> (u8, u8, u8) {
    const STOPS: [(f32, f32, f32); 5] =
        [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f32, q: f32| (p + (q - p) * f).round() as u8;
    (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// Dark text on the bright end of the scale, light text on the dark end.
fn ink(t: f32) -> &'static str {
    if t > 0.6 {
        "#111"
    } else {
        "#fff"
    }
}

/// Escapes text for HTML and SVG (element content and attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A token as shown in a cell: visible spaces, at most `max` characters.
fn shown(text: &str, max: usize) -> String {
    let visible = text.replace(' ', "·");
    if visible.chars().count() <= max {
        visible
    } else {
        visible.chars().take(max - 1).collect::<String>() + "…"
    }
}

/// The lens as a self-contained HTML page: the heatmap, a metric switch, and a tooltip with each
/// cell's top tokens, entropy, KL and the next token's rank. `label(id)` is a token's text.
pub fn lens_html(lens: &Lens, label: &dyn Fn(u32) -> String, metric: LensMetric) -> String {
    let positions = lens.tokens.len();
    let mut cells = String::new();
    for r in (0..lens.rows.len()).rev() {
        let _ = write!(cells, "<tr><th class=\"row\">{}</th>", escape(&lens.rows[r]));
        for p in 0..positions {
            let top = lens.top_ids[r][p][0];
            let hit = lens.tokens.get(p + 1) == Some(&top);
            let _ = write!(
                cells,
                "<td data-r=\"{r}\" data-p=\"{p}\"{}>{}</td>",
                if hit { " class=\"hit\"" } else { "" },
                escape(&shown(&label(top), 10))
            );
        }
        cells.push_str("</tr>\n");
    }
    let header = |ids: &mut dyn Iterator<Item = Option<u32>>, class: &str, title: &str| {
        let mut row = format!("<tr class=\"{class}\"><th class=\"row\">{title}</th>");
        for id in ids {
            let text = id.map(|id| escape(&shown(&label(id), 10))).unwrap_or_default();
            let _ = write!(row, "<th>{text}</th>");
        }
        row + "</tr>\n"
    };
    let next_row = header(&mut (0..positions).map(|p| lens.tokens.get(p + 1).copied()), "next", "next token");
    let input_row = header(&mut lens.tokens.iter().map(|&id| Some(id)), "input", "input");

    // Everything the script needs, as JSON: token texts, the lens, the metric names.
    let texts: std::collections::BTreeMap<u32, String> = lens
        .top_ids
        .iter()
        .flatten()
        .flatten()
        .chain(&lens.tokens)
        .chain(&lens.final_top)
        .map(|&id| (id, label(id)))
        .collect();
    let metrics: Vec<serde_json::Value> = [LensMetric::Logits, LensMetric::Probs, LensMetric::Ranks, LensMetric::Kl]
        .iter()
        .map(|m| {
            let values = m.values(lens);
            let (unit, lo, hi) = m.scale(&values);
            serde_json::json!({"name": m.name(), "describe": m.describe(), "unit": unit, "lo": lo, "hi": hi})
        })
        .collect();
    let colours: Vec<String> = (0..=32).map(|i| hex(colour(i as f32 / 32.0))).collect();
    let data = serde_json::json!({
        "lens": lens,
        "texts": texts,
        "metric": metric.name(),
        "metrics": metrics,
        "colours": colours,
    });
    // `</` cannot close the script element from inside a JSON string.
    let json = data.to_string().replace("</", "<\\/");
    let options: String = ["logits", "probs", "ranks", "kl"]
        .iter()
        .map(|m| format!("<option{}>{m}</option>", if *m == metric.name() { " selected" } else { "" }))
        .collect();
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>logit lens</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 4px; text-align: center; white-space: pre; font-family: ui-monospace, monospace; font-size: 12px; }}
td {{ min-width: 56px; border: 1px solid #fff; cursor: default; }}
td.hit {{ outline: 2px solid #e0115f; outline-offset: -2px; font-weight: bold; }}
th.row {{ text-align: right; font-family: system-ui, sans-serif; color: #555; }}
tr.next th {{ color: #e0115f; }} tr.input th {{ border-top: 1px solid #999; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 6px 8px; box-shadow: 0 2px 6px #0003; font-size: 12px; pointer-events: none; }}
#tip table td {{ min-width: 0; border: 0; text-align: left; }}
#legend {{ display: inline-block; vertical-align: middle; width: 160px; height: 12px; margin: 0 6px; }}
</style></head>
<body>
<h3>Logit lens</h3>
<p>Colour: <select id="metric">{options}</select> <span id="lo"></span><canvas id="legend" width="160" height="12"></canvas><span id="hi"></span>
<span id="describe"></span>. Brighter = closer to the model's output. Outlined: the layer's top token is the actual next token.</p>
<table id="lens">
{next_row}{cells}{input_row}</table>
<div id="tip"></div>
<script>
const DATA = {json};
const L = DATA.lens, T = id => DATA.texts[id] ?? ('#' + id);
const esc = s => s.replace(/[&<>"]/g, c => ({{'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}})[c]);
function paint(name) {{
  const m = DATA.metrics.find(m => m.name === name);
  document.querySelectorAll('#lens td').forEach(td => {{
    const u = m.unit[td.dataset.r][td.dataset.p];
    td.style.background = DATA.colours[Math.round(u * 32)];
    td.style.color = u > 0.6 ? '#111' : '#fff';
  }});
  const reversed = name === 'ranks' || name === 'kl'; // bright = low rank, low KL
  document.getElementById('lo').textContent = (reversed ? m.hi : m.lo).toPrecision(3);
  document.getElementById('hi').textContent = (reversed ? m.lo : m.hi).toPrecision(3);
  document.getElementById('describe').textContent = m.describe;
  const g = document.getElementById('legend').getContext('2d');
  DATA.colours.forEach((c, i) => {{ g.fillStyle = c; g.fillRect(i * 5, 0, 5, 12); }});
}}
const tip = document.getElementById('tip');
document.querySelectorAll('#lens td').forEach(td => {{
  td.addEventListener('mousemove', e => {{
    const r = +td.dataset.r, p = +td.dataset.p;
    let rows = L.top_ids[r][p].map((id, k) =>
      `<tr><td>${{esc(JSON.stringify(T(id)))}}</td><td>${{(L.top_probs[r][p][k] * 100).toFixed(2)}}%</td></tr>`).join('');
    let next = p + 1 < L.tokens.length
      ? `<br>next ${{esc(JSON.stringify(T(L.tokens[p + 1])))}}: rank ${{L.next_rank[r][p]}}, p ${{L.next_prob[r][p].toExponential(2)}}` : '';
    tip.innerHTML = `<b>${{esc(L.rows[r])}}</b> at ${{p}} (${{esc(JSON.stringify(T(L.tokens[p])))}})<table>${{rows}}</table>` +
      `top logit ${{L.top_logit[r][p].toFixed(3)}}, entropy ${{L.entropy[r][p].toFixed(3)}}, KL ${{L.kl_to_final[r][p].toExponential(2)}}${{next}}`;
    tip.style.display = 'block';
    tip.style.left = Math.min(e.clientX + 12, innerWidth - tip.offsetWidth - 4) + 'px';
    tip.style.top = Math.min(e.clientY + 12, innerHeight - tip.offsetHeight - 4) + 'px';
  }});
  td.addEventListener('mouseleave', () => tip.style.display = 'none');
}});
const select = document.getElementById('metric');
select.addEventListener('change', () => paint(select.value));
paint(DATA.metric);
document.body.dataset.ready = 'lens';
</script>
</body></html>
"#
    )
}

/// The lens heatmap as a standalone SVG (for papers): the same grid as [`lens_html`], without the
/// interactivity.
pub fn lens_svg(lens: &Lens, label: &dyn Fn(u32) -> String, metric: LensMetric) -> String {
    const CELL_W: usize = 64;
    const CELL_H: usize = 20;
    const LEFT: usize = 96;
    const TOP: usize = 52;
    let (rows, positions) = (lens.rows.len(), lens.tokens.len());
    let values = metric.values(lens);
    let (unit, lo, hi) = metric.scale(&values);
    let title = format!(
        "Logit lens: {} ({} to {}); outlined: top token = next token",
        metric.describe(),
        fmt_value(lo),
        fmt_value(hi)
    );
    // About 7.5 px per character of 13 px sans-serif.
    let width = (LEFT + positions * CELL_W + 16).max(LEFT + title.chars().count() * 15 / 2 + 16);
    let height = TOP + (rows + 1) * CELL_H + 12;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"DejaVu Sans Mono, monospace\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"18\" font-family=\"DejaVu Sans, sans-serif\" font-size=\"13\">{}</text>",
        escape(&title)
    );
    let text_at = |svg: &mut String, x: usize, y: usize, anchor: &str, fill: &str, text: &str| {
        let _ = writeln!(
            svg,
            "<text x=\"{x}\" y=\"{y}\" text-anchor=\"{anchor}\" dominant-baseline=\"central\" fill=\"{fill}\">{}</text>",
            escape(text)
        );
    };
    // The next tokens above the grid, the inputs below it.
    for p in 0..positions {
        let x = LEFT + p * CELL_W + CELL_W / 2;
        if let Some(&next) = lens.tokens.get(p + 1) {
            text_at(&mut svg, x, TOP - CELL_H / 2, "middle", "#e0115f", &shown(&label(next), 9));
        }
        text_at(&mut svg, x, TOP + rows * CELL_H + CELL_H / 2 + 2, "middle", "#222", &shown(&label(lens.tokens[p]), 9));
    }
    text_at(&mut svg, LEFT - 6, TOP - CELL_H / 2, "end", "#e0115f", "next");
    text_at(&mut svg, LEFT - 6, TOP + rows * CELL_H + CELL_H / 2 + 2, "end", "#222", "input");
    for (i, r) in (0..rows).rev().enumerate() {
        let y = TOP + i * CELL_H;
        text_at(&mut svg, LEFT - 6, y + CELL_H / 2, "end", "#555", &lens.rows[r]);
        for (p, &t) in unit[r].iter().enumerate() {
            let x = LEFT + p * CELL_W;
            let top = lens.top_ids[r][p][0];
            let hit = lens.tokens.get(p + 1) == Some(&top);
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"{}\" stroke=\"{}\" stroke-width=\"{}\"/>",
                hex(colour(t)),
                if hit { "#e0115f" } else { "#fff" },
                if hit { 2 } else { 1 }
            );
            text_at(&mut svg, x + CELL_W / 2, y + CELL_H / 2, "middle", ink(t), &shown(&label(top), 9));
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn fmt_value(v: f32) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders an SVG (such as [`lens_svg`]'s) to PNG at twice its size. Text is drawn with the
/// system's fonts; with none installed this is an error rather than a picture without labels.
pub fn svg_to_png(svg: &str) -> layerwise::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let failed = |why: String| png_error(why);
    let mut options = usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    if options.fontdb.is_empty() {
        return Err(failed(
            "no system font found to draw the labels with (install e.g. fonts-dejavu-core), or write .svg".into(),
        ));
    }
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| failed(format!("cannot read the SVG: {e}")))?;
    let size = tree.size().to_int_size().scale_by(2.0).ok_or_else(|| failed("the picture is empty".into()))?;
    let mut pixmap =
        tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| failed("the picture is too large".into()))?;
    resvg::render(&tree, tiny_skia::Transform::from_scale(2.0, 2.0), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| failed(format!("cannot encode: {e}")))
}

/// One line of a [`line_plot_svg`]: a name and its points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line plot as a standalone SVG: axes with a few ticks, one coloured line per series with a
/// legend, and an optional dashed horizontal line (e.g. a threshold).
pub fn line_plot_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    guide: Option<(f64, &str)>,
) -> String {
    let (width, height) = (640.0, 360.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"DejaVu Sans, sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
    );
    panel(&mut svg, (0.0, 0.0, width, height), title, x_label, y_label, series, guide, true);
    svg.push_str("</svg>\n");
    svg
}

/// Several line plots on a grid, `columns` wide (e.g. one panel per layer).
pub fn small_multiples_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    panels: &[(String, Vec<Series>)],
    columns: usize,
) -> String {
    let (w, h) = (300.0, 200.0);
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns);
    let (width, height) = (w * columns as f64, h * rows as f64 + 28.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"DejaVu Sans, sans-serif\" font-size=\"10\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n\
         <text x=\"8\" y=\"18\" font-size=\"13\">{}</text>\n",
        escape(title)
    );
    for (i, (name, series)) in panels.iter().enumerate() {
        let (x, y) = ((i % columns) as f64 * w, 28.0 + (i / columns) as f64 * h);
        panel(&mut svg, (x, y, w, h), name, x_label, y_label, series, None, i == 0);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Draws one plot into `area = (x, y, width, height)`.
#[allow(clippy::too_many_arguments)]
fn panel(
    svg: &mut String,
    (x0, y0, w, h): (f64, f64, f64, f64),
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    guide: Option<(f64, &str)>,
    legend: bool,
) {
    const PALETTE: [&str; 10] =
        ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
    let (left, right, top, bottom) = (x0 + 52.0, x0 + w - 12.0, y0 + 26.0, y0 + h - 34.0);
    let points = series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let ys = guide.map(|g| g.0).into_iter();
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points {
        (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
    }
    for y in ys {
        (y_lo, y_hi) = (y_lo.min(y), y_hi.max(y));
    }
    if !x_lo.is_finite() {
        (x_lo, x_hi, y_lo, y_hi) = (0.0, 1.0, 0.0, 1.0);
    }
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    if y_hi <= y_lo {
        (y_lo, y_hi) = (y_lo - 0.5, y_hi + 0.5);
    }
    let pad = (y_hi - y_lo) * 0.05;
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    let sx = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * (right - left);
    let sy = |y: f64| bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top);
    let _ = writeln!(svg, "<text x=\"{left}\" y=\"{}\" font-size=\"12\">{}</text>", y0 + 16.0, escape(title));
    let _ = writeln!(
        svg,
        "<path d=\"M{left},{top}V{bottom}H{right}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (left + right) / 2.0,
        y0 + h - 6.0,
        escape(x_label),
        x0 + 12.0,
        (top + bottom) / 2.0,
        escape(y_label)
    );
    ticks(svg, (left, bottom), (x_lo, x_hi), (y_lo, y_hi), &sx, &sy);
    if let Some((y, label)) = guide {
        let _ = writeln!(
            svg,
            "<path d=\"M{left},{:.1}H{right}\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/>\n<text x=\"{right}\" y=\"{:.1}\" \
             text-anchor=\"end\" fill=\"#d62728\">{}</text>",
            sy(y),
            sy(y) - 4.0,
            escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if !path.is_empty() {
            let _ = writeln!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>",
                path.join(" ")
            );
        }
        if legend && series.len() > 1 {
            let (lx, ly) = (right - 70.0, top + 4.0 + 12.0 * i as f64);
            let _ = writeln!(
                svg,
                "<path d=\"M{lx},{ly}h14\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{ly}\" \
                 dominant-baseline=\"central\">{}</text>",
                lx + 18.0,
                escape(&s.name)
            );
        }
    }
}

/// Five labelled ticks along each axis of a plot whose axes meet at `(left, bottom)`.
fn ticks(
    svg: &mut String,
    (left, bottom): (f64, f64),
    (x_lo, x_hi): (f64, f64),
    (y_lo, y_hi): (f64, f64),
    sx: &dyn Fn(f64) -> f64,
    sy: &dyn Fn(f64) -> f64,
) {
    for i in 0..=4 {
        let (xv, yv) = (x_lo + (x_hi - x_lo) * i as f64 / 4.0, y_lo + (y_hi - y_lo) * i as f64 / 4.0);
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" \
             dominant-baseline=\"central\">{}</text>",
            sx(xv),
            bottom + 14.0,
            tick(xv),
            left - 4.0,
            sy(yv),
            tick(yv)
        );
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 1000.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The pages' data: `tokens`, and `layers` as `[{layer, heads: [head][query][key]}]`.
fn attention_data(tokens: &[String], layers: &std::collections::BTreeMap<usize, Vec<f32>>) -> serde_json::Value {
    let t = tokens.len();
    serde_json::json!({
        "tokens": tokens,
        "layers": layers.iter().map(|(layer, probs)| {
            let heads: Vec<Vec<Vec<f32>>> = probs.chunks(t * t).map(|h| h.chunks(t).map(<[f32]>::to_vec).collect()).collect();
            serde_json::json!({"layer": layer, "heads": heads})
        }).collect::<Vec<_>>(),
    })
}

/// Attention probabilities as a self-contained HTML page in the manner of bertviz's head view: the
/// tokens in two columns (queries left, keys right) and a line from each query to each key it
/// attends to, one colour per head, opacity = probability. A layer menu, head toggles (click; double
/// click shows one head alone) and hover on a token to see only its lines.
/// `layers` maps a block to its probabilities `[heads, T, T]`.
pub fn attention_html(
    tokens: &[String],
    layers: &std::collections::BTreeMap<usize, Vec<f32>>,
    initial_layer: usize,
) -> String {
    let mut data = attention_data(tokens, layers);
    data["initial"] = serde_json::json!(initial_layer);
    let json = data.to_string().replace("</", "<\\/");
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attention head view</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
#heads span {{ display: inline-block; width: 18px; height: 18px; margin: 0 3px 0 0; cursor: pointer; border: 2px solid #fff; color: #fff; font-size: 10px; text-align: center; line-height: 18px; }}
#heads span.off {{ opacity: 0.2; }}
svg text {{ font-family: ui-monospace, monospace; font-size: 12px; cursor: default; }}
</style></head>
<body>
<h3>Attention</h3>
<p>Layer: <select id="layer"></select> Heads: <span id="heads"></span></p>
<svg id="view"></svg>
<script>
const DATA = {json};
const COLOURS = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf','#393b79','#637939','#8c6d31','#843c39','#7b4173','#3182bd'];
const NS = 'http://www.w3.org/2000/svg', ROW = 20, LEFT = 180, RIGHT = 420, TOP = 16;
const select = document.getElementById('layer'), view = document.getElementById('view');
let active = [], focus = null;
DATA.layers.forEach((l, i) => {{ const o = document.createElement('option'); o.value = i; o.textContent = l.layer; select.appendChild(o); }});
select.value = Math.max(0, DATA.layers.findIndex(l => l.layer === DATA.initial));
function el(name, attrs, text) {{
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}}
function heads() {{
  const box = document.getElementById('heads'), layer = DATA.layers[+select.value];
  if (active.length !== layer.heads.length) active = layer.heads.map(() => true);
  box.innerHTML = '';
  layer.heads.forEach((_, h) => {{
    const s = document.createElement('span');
    s.textContent = h; s.style.background = COLOURS[h % COLOURS.length]; s.className = active[h] ? '' : 'off';
    s.onclick = () => {{ active[h] = !active[h]; draw(); }};
    s.ondblclick = () => {{ active = active.map((_, k) => k === h); draw(); }};
    box.appendChild(s);
  }});
}}
function draw() {{
  heads();
  const layer = DATA.layers[+select.value], n = DATA.tokens.length;
  view.innerHTML = '';
  view.setAttribute('width', RIGHT + 200); view.setAttribute('height', TOP + n * ROW + 8);
  const y = i => TOP + i * ROW + ROW / 2;
  layer.heads.forEach((map, h) => {{
    if (!active[h]) return;
    map.forEach((row, i) => row.forEach((w, j) => {{
      if (w < 0.005) return;
      if (focus && !((focus.side === 'q' && focus.i === i) || (focus.side === 'k' && focus.i === j))) return;
      view.appendChild(el('line', {{ x1: LEFT + 6, y1: y(i), x2: RIGHT - 6, y2: y(j), stroke: COLOURS[h % COLOURS.length],
        'stroke-width': 2, 'stroke-opacity': w.toFixed(3) }}));
    }}));
  }});
  DATA.tokens.forEach((tok, i) => {{
    for (const [side, x, anchor] of [['q', LEFT, 'end'], ['k', RIGHT, 'start']]) {{
      const t = el('text', {{ x, y: y(i), 'text-anchor': anchor, 'dominant-baseline': 'central' }}, tok);
      t.onmouseenter = () => {{ focus = {{ side, i }}; draw(); }};
      t.onmouseleave = () => {{ focus = null; draw(); }};
      view.appendChild(t);
    }}
  }});
}}
select.onchange = () => {{ active = []; draw(); }};
draw();
document.body.dataset.ready = 'attention';
</script>
</body></html>
"#
    )
}

/// A `[layer][head]` table as an SVG heatmap: a cell per head (viridis, scaled to the table's
/// range) with its value printed, layers down, heads across.
pub fn head_table_svg(title: &str, table: &[Vec<f32>]) -> String {
    let heads = table.iter().map(Vec::len).max().unwrap_or(0);
    let (cell_w, cell_h, left, top) = (56.0, 22.0, 64.0, 48.0);
    let (width, height) = (left + cell_w * heads as f64 + 12.0, top + cell_h * table.len() as f64 + 12.0);
    let finite = table.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let scale = |v: f32| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"DejaVu Sans, sans-serif\" font-size=\"10\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n\
         <text x=\"8\" y=\"18\" font-size=\"13\">{}</text>\n",
        escape(title)
    );
    for head in 0..heads {
        let x = left + cell_w * (head as f64 + 0.5);
        let _ = writeln!(svg, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">head {head}</text>", top - 6.0);
    }
    for (layer, row) in table.iter().enumerate() {
        let y = top + cell_h * layer as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" dominant-baseline=\"central\">layer {layer}</text>",
            left - 6.0,
            y + cell_h / 2.0
        );
        for (head, &v) in row.iter().enumerate() {
            let x = left + cell_w * head as f64;
            let t = scale(v);
            let _ = writeln!(
                svg,
                "<rect class=\"cell\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{cell_w}\" height=\"{cell_h}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" dominant-baseline=\"central\" fill=\"{}\">{}</text>",
                hex(colour(t)),
                x + cell_w / 2.0,
                y + cell_h / 2.0,
                ink(t),
                fmt_value(v)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// One labelled point of a [`scatter_svg`].
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// A scatter plot as a standalone SVG: axes with a few ticks, a dot per point (its label as the
/// hover title) and a subtitle line (e.g. the correlation coefficient).
pub fn scatter_svg(title: &str, subtitle: &str, x_label: &str, y_label: &str, points: &[Point]) -> String {
    let (width, height) = (640.0, 400.0);
    let (left, right, top, bottom) = (60.0, width - 16.0, 48.0, height - 40.0);
    let finite: Vec<&Point> = points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).collect();
    let range = |values: Vec<f64>| {
        let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        match (lo.is_finite(), hi > lo) {
            (false, _) => (0.0, 1.0),
            (true, false) => (lo - 0.5, hi + 0.5),
            (true, true) => (lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05),
        }
    };
    let (x_lo, x_hi) = range(finite.iter().map(|p| p.x).collect());
    let (y_lo, y_hi) = range(finite.iter().map(|p| p.y).collect());
    let sx = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * (right - left);
    let sy = |y: f64| bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"DejaVu Sans, sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"13\">{}</text>\n<text x=\"{left}\" y=\"34\">{}</text>\n\
         <path d=\"M{left},{top}V{bottom}H{right}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(14,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        escape(title),
        escape(subtitle),
        (left + right) / 2.0,
        height - 6.0,
        escape(x_label),
        (top + bottom) / 2.0,
        escape(y_label)
    );
    ticks(&mut svg, (left, bottom), (x_lo, x_hi), (y_lo, y_hi), &sx, &sy);
    for p in finite {
        let _ = writeln!(
            svg,
            "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#1f77b4\" fill-opacity=\"0.75\"><title>{}: \
             ({}, {})</title></circle>",
            sx(p.x),
            sy(p.y),
            escape(&p.label),
            tick(p.x),
            tick(p.y)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A [`scatter_svg`] in a self-contained HTML page, with the points as a table sortable by
/// either column (click its header).
pub fn scatter_html(title: &str, subtitle: &str, x_label: &str, y_label: &str, points: &[Point]) -> String {
    let svg = scatter_svg(title, subtitle, x_label, y_label, points);
    let rows: Vec<serde_json::Value> = points.iter().map(|p| serde_json::json!([p.label, p.x, p.y])).collect();
    let json =
        serde_json::json!({"columns": ["head", x_label, y_label], "rows": rows}).to_string().replace("</", "<\\/");
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
table {{ border-collapse: collapse; margin-top: 12px; }}
th, td {{ padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; }}
th {{ cursor: pointer; }}
circle.point:hover {{ fill: #d62728; }}
</style></head>
<body>
{svg}
<table id="points"></table>
<script>
const DATA = {json};
let order = [1, -1];
function draw() {{
  const table = document.getElementById('points');
  const rows = DATA.rows.slice().sort((a, b) => order[1] * (a[order[0]] < b[order[0]] ? -1 : a[order[0]] > b[order[0]] ? 1 : 0));
  table.innerHTML = '';
  const head = table.insertRow();
  DATA.columns.forEach((c, i) => {{
    const th = document.createElement('th'); th.textContent = c + (order[0] === i ? (order[1] > 0 ? ' ▲' : ' ▼') : '');
    th.onclick = () => {{ order = [i, order[0] === i ? -order[1] : -1]; draw(); }};
    head.appendChild(th);
  }});
  rows.forEach(r => {{ const tr = table.insertRow(); r.forEach((v, i) => {{ tr.insertCell().textContent = i ? (+v).toPrecision(4) : v; }}); }});
}}
draw();
document.body.dataset.ready = 'scatter';
</script>
</body></html>
"#,
        title = escape(title)
    )
}

/// Attention of every layer and head at once, in the manner of bertviz's model view: a grid with a
/// row per layer and a column per head, each cell a thumbnail of that head's query-to-key lines
/// (drawn on a canvas, opacity = probability); click a cell to see it large with the tokens.
/// `layers` maps a block to `[heads, T, T]`. With `sentence_b_start` (a BERT pair: the first token
/// of the second segment), a menu limits the lines to A→A, A→B, B→A or B→B.
pub fn model_view_html(
    tokens: &[String],
    layers: &std::collections::BTreeMap<usize, Vec<f32>>,
    sentence_b_start: Option<usize>,
) -> String {
    let mut data = attention_data(tokens, layers);
    data["sentence_b_start"] = serde_json::json!(sentence_b_start);
    let json = data.to_string().replace("</", "<\\/");
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attention model view</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
#grid {{ border-collapse: collapse; }}
#grid td {{ padding: 2px; }}
#grid th {{ font-weight: normal; color: #666; padding: 2px 6px; }}
canvas.cell {{ border: 1px solid #ddd; cursor: pointer; }}
canvas.cell:hover {{ border-color: #333; }}
#detail {{ margin-top: 12px; }}
</style></head>
<body>
<h3>Attention: every layer and head</h3>
<p id="pairs" hidden>Lines: <select id="filter"><option value="all">all</option><option value="aa">A → A</option>
<option value="ab">A → B</option><option value="ba">B → A</option><option value="bb">B → B</option></select></p>
<table id="grid"></table>
<div id="detail"></div>
<script>
const DATA = {json};
const COLOURS = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf','#393b79','#637939','#8c6d31','#843c39','#7b4173','#3182bd'];
const n = DATA.tokens.length, B = DATA.sentence_b_start;
const filter = document.getElementById('filter');
if (B !== null) document.getElementById('pairs').hidden = false;
function shown(i, j) {{
  if (B === null || filter.value === 'all') return true;
  const side = k => (k < B ? 'a' : 'b');
  return side(i) + side(j) === filter.value;
}}
function paint(canvas, map, colour, rowHeight, left, right, labels) {{
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.strokeStyle = colour; g.lineWidth = labels ? 2 : 1;
  const y = i => 4 + i * rowHeight + rowHeight / 2;
  map.forEach((row, i) => row.forEach((w, j) => {{
    if (w < 0.01 || !shown(i, j)) return;
    g.globalAlpha = Math.min(1, w);
    g.beginPath(); g.moveTo(left, y(i)); g.lineTo(right, y(j)); g.stroke();
  }}));
  g.globalAlpha = 1;
  if (labels) {{
    g.fillStyle = '#222'; g.font = '12px monospace'; g.textBaseline = 'middle';
    DATA.tokens.forEach((tok, i) => {{
      g.textAlign = 'right'; g.fillText(tok, left - 6, y(i));
      g.textAlign = 'left'; g.fillText(tok, right + 6, y(i));
    }});
  }}
}}
function detail(layer, h) {{
  const box = document.getElementById('detail');
  box.innerHTML = '<p>Layer ' + DATA.layers[layer].layer + ', head ' + h + '</p>';
  const c = document.createElement('canvas');
  c.width = 600; c.height = 8 + n * 18; c.id = 'large';
  box.appendChild(c);
  paint(c, DATA.layers[layer].heads[h], COLOURS[h % COLOURS.length], 18, 200, 400, true);
}}
function draw() {{
  const grid = document.getElementById('grid');
  grid.innerHTML = '';
  const heads = Math.max(...DATA.layers.map(l => l.heads.length));
  const top = grid.insertRow(); top.appendChild(document.createElement('th'));
  for (let h = 0; h < heads; h++) {{ const th = document.createElement('th'); th.textContent = 'head ' + h; top.appendChild(th); }}
  DATA.layers.forEach((l, li) => {{
    const tr = grid.insertRow();
    const th = document.createElement('th'); th.textContent = 'layer ' + l.layer; tr.appendChild(th);
    l.heads.forEach((map, h) => {{
      const c = document.createElement('canvas');
      c.className = 'cell'; c.width = 72; c.height = 8 + n * Math.max(1, Math.min(6, 100 / n));
      c.dataset.layer = l.layer; c.dataset.head = h;
      c.onclick = () => detail(li, h);
      tr.insertCell().appendChild(c);
      paint(c, map, COLOURS[h % COLOURS.length], Math.max(1, Math.min(6, 100 / n)), 6, 66, false);
    }});
  }});
}}
filter.onchange = draw;
draw();
if (DATA.layers.length) detail(0, 0);
document.body.dataset.ready = 'model-view';
</script>
</body></html>
"#
    )
}

/// A PNG export error, in the engine's error type (the callers add the flag).
fn png_error(why: String) -> layerwise::Error {
    layerwise::Error::InvalidArgument { what: "PNG".into(), reason: why }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise::analysis::lens::{logit_lens, LensOptions};

    #[test]
    fn the_lens_renders_as_an_html_table_and_an_svg() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
        let model = layerwise::load(dir).expect("load").model;
        let lens = logit_lens(&model, &[5, 17, 42], &LensOptions::default()).expect("lens");
        let label = |id: u32| format!("#{id}");
        assert!(lens_html(&lens, &label, LensMetric::Probs).contains("<table"));
        assert!(lens_svg(&lens, &label, LensMetric::Kl).starts_with("<svg"));
    }
}

//! Minimal PNG charts for benchmark reports: a grouped bar chart rendered
//! into an RGB8 raster and encoded with the `png` crate.
//!
//! No system fonts and no plotting library: text uses a 5x7 bitmap font
//! built into this module (printable ASCII; anything else is drawn as a
//! box), at integer scale 1 (labels) or 2 (title). Lowercase g, p, q and y
//! drop two rows below the baseline.
//!
//! ```no_run
//! use transfer::chart::{BarChart, Series};
//! let chart = BarChart {
//!     title: "KV transfer bandwidth".into(),
//!     y_label: "GB/s".into(),
//!     groups: vec!["contiguous".into(), "random".into()],
//!     series: vec![
//!         Series { name: "naive READ".into(), values: vec![3.1, 0.4] },
//!         Series { name: "coalesced READ".into(), values: vec![9.2, f64::NAN] },
//!     ],
//!     reference: Some(("memcpy ceiling".into(), 9.8)),
//! };
//! chart.write_png(std::path::Path::new("bench.png"), 800, 480).unwrap();
//! ```

use std::path::{Path, PathBuf};

/// Series colours (Okabe-Ito, black replaced by grey), colour-blind
/// friendly; series `i` uses `PALETTE[i % 8]`.
pub const PALETTE: [[u8; 3]; 8] = [
    [0, 114, 178],   // blue
    [230, 159, 0],   // orange
    [0, 158, 115],   // bluish green
    [213, 94, 0],    // vermillion
    [204, 121, 167], // reddish purple
    [86, 180, 233],  // sky blue
    [240, 228, 66],  // yellow
    [110, 110, 110], // grey
];

const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];
const GRID: [u8; 3] = [225, 225, 225];
/// Colour of the dashed reference line and its label.
const REF_INK: [u8; 3] = [150, 20, 20];

const MIN_W: u32 = 200;
const MIN_H: u32 = 150;
const MARGIN: i64 = 10;
const SWATCH: i64 = 9;
/// Horizontal space between legend entries.
const LEGEND_GAP: i64 = 14;
/// Room above the plot for the value label of a bar reaching the axis top.
const HEADROOM: i64 = 12;
const GLYPH_W: i64 = 5;
const GLYPH_H: i64 = 7;
/// Horizontal advance per character (glyph plus one column of spacing).
const ADVANCE: i64 = 6;

/// One bar per group; `NaN` marks a missing bar.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// A grouped bar chart: `groups` along the x axis, one bar per series in
/// each group, values from 0 upwards on the y axis.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    /// Unit of the y axis, e.g. "GB/s" (drawn vertically, reading upwards).
    pub y_label: String,
    /// X-axis categories, e.g. `["contiguous", "random", "fragmented"]`.
    pub groups: Vec<String>,
    /// Bars within each group; every series has one value per group.
    pub series: Vec<Series>,
    /// Optional horizontal dashed line, e.g. `("memcpy ceiling", 9.8)`.
    pub reference: Option<(String, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("chart has no groups")]
    NoGroups,
    #[error("series {series:?} has {got} values but the chart has {expected} groups")]
    SeriesLength {
        series: String,
        expected: usize,
        got: usize,
    },
    #[error("chart size {width}x{height} is too small (minimum 200x150, more with long labels)")]
    TooSmall { width: u32, height: u32 },
    #[error("{what} has invalid value {value} (must be finite and >= 0, or NaN for missing)")]
    BadValue { what: String, value: f64 },
    #[error("PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
    #[error("writing {path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An RGB8 raster, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// An image filled with one colour.
    pub fn new(width: u32, height: u32, fill: [u8; 3]) -> Self {
        let rgb = fill.repeat(width as usize * height as usize);
        Image { width, height, rgb }
    }

    /// The colour at `(x, y)`. Panics when outside the image.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        assert!(x < self.width && y < self.height, "pixel outside image");
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// PNG (RGB, 8 bit) bytes of this image.
    pub fn encode_png(&self) -> Result<Vec<u8>, ChartError> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(out)
    }

    /// Sets one pixel; coordinates outside the image are ignored (clipping).
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && x < self.width as i64 && y < self.height as i64 {
            let i = (y as usize * self.width as usize + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fills the half-open rectangle `[x0, x1) x [y0, y1)`, clipped.
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.max(0)..y1.min(self.height as i64) {
            for x in x0.max(0)..x1.min(self.width as i64) {
                self.put(x, y, c);
            }
        }
    }

    /// Draws `s` with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        self.glyphs(s, scale, c, |along, across| (x + along, y + across));
    }

    /// Draws `s` rotated 90 degrees counter-clockwise (reading upwards),
    /// its left edge at `x` and the start of the text at row `y`.
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        self.glyphs(s, scale, c, |along, across| (x + across, y - along));
    }

    /// Rasterises `s`; `at(along, across)` maps an offset along the text and
    /// one across it (downwards in upright text) to image coordinates.
    fn glyphs(&mut self, s: &str, k: i64, c: [u8; 3], at: impl Fn(i64, i64) -> (i64, i64)) {
        for (i, ch) in s.chars().enumerate() {
            let drop = if "gpqy".contains(ch) { 2 } else { 0 };
            for (row, bits) in (drop..).zip(glyph(ch)) {
                for col in (0..GLYPH_W).filter(|col| bits & (0x10 >> col) != 0) {
                    for d in 0..k * k {
                        let along = (i as i64 * ADVANCE + col) * k + d % k;
                        let (x, y) = at(along, row * k + d / k);
                        self.put(x, y, c);
                    }
                }
            }
        }
    }
}

/// Width in pixels of `s` drawn at `scale` (no trailing spacing).
fn text_width(s: &str, scale: i64) -> i64 {
    (s.chars().count() as i64 * ADVANCE - 1).max(0) * scale
}

/// The 7 rows (top first, bit 4 = left column) of the glyph for `c`;
/// characters outside printable ASCII get a box.
fn glyph(c: char) -> [u8; 7] {
    let bits = match c as u32 {
        v @ 32..=126 => FONT[(v - 32) as usize],
        _ => 0x1f11111111111f,
    };
    std::array::from_fn(|row| (bits >> (8 * (6 - row))) as u8 & 0x1f)
}

/// 5x7 glyphs for ASCII 32..=126, one byte per row (top row in the high
/// byte), bit 4 of each byte = left column; five glyphs per line.
#[rustfmt::skip]
const FONT: [u64; 95] = [
    0x00000000000000, 0x04040404040004, 0x0a0a0000000000, 0x0a0a1f0a1f0a0a, 0x040f140e051e04, // space ! " # $
    0x18190204081303, 0x0c12140815120d, 0x04040000000000, 0x02040808080402, 0x08040202020408, // % & ' ( )
    0x0004150e150400, 0x0004041f040400, 0x00000000040408, 0x0000001f000000, 0x00000000000004, // * + , - .
    0x00010204081000, 0x0e11131519110e, 0x040c040404040e, 0x0e11010204081f, 0x1f02040201110e, // / 0 1 2 3
    0x02060a121f0202, 0x1f101e0101110e, 0x0608101e11110e, 0x1f010204080808, 0x0e11110e11110e, // 4 5 6 7 8
    0x0e11110f01020c, 0x00000400000400, 0x00000400040408, 0x02040810080402, 0x00001f001f0000, // 9 : ; < =
    0x08040201020408, 0x0e110102040004, 0x0e11010d15150e, 0x0e11111f111111, 0x1e11111e11111e, // > ? @ A B
    0x0e11101010110e, 0x1c12111111121c, 0x1f10101e10101f, 0x1f10101e101010, 0x0e11101711110f, // C D E F G
    0x1111111f111111, 0x0e04040404040e, 0x0702020202120c, 0x11121418141211, 0x1010101010101f, // H I J K L
    0x111b1515111111, 0x11111915131111, 0x0e11111111110e, 0x1e11111e101010, 0x0e11111115120d, // M N O P Q
    0x1e11111e141211, 0x0f10100e01011e, 0x1f040404040404, 0x1111111111110e, 0x11111111110a04, // R S T U V
    0x1111111515150a, 0x11110a040a1111, 0x11110a04040404, 0x1f01020408101f, 0x0e08080808080e, // W X Y Z [
    0x00100804020100, 0x0e02020202020e, 0x040a1100000000, 0x0000000000001f, 0x08040000000000, // \ ] ^ _ `
    0x00000e010f110f, 0x1010161911111e, 0x00000e1010110e, 0x01010d1311110f, 0x00000e111f100e, // a b c d e
    0x0609081c080808, 0x0f1111110f010e, 0x10101619111111, 0x04000c0404040e, 0x0200060202120c, // f g h i j
    0x10101214181412, 0x0c04040404040e, 0x00001a15151111, 0x00001619111111, 0x00000e1111110e, // k l m n o
    0x1e1111111e1010, 0x0f1111110f0101, 0x00001619101010, 0x00000f100e011e, 0x08081c08080906, // p q r s t
    0x0000111111130d, 0x00001111110a04, 0x0000111115150a, 0x0000110a040a11, 0x111111110f010e, // u v w x y
    0x00001f0204081f, 0x02040408040402, 0x04040404040404, 0x08040402040408, 0x00000815020000, // z { | } ~
];

/// Layout of a chart: where the plot area is, how values map to rows and
/// bars to columns.
struct Frame {
    /// Column of the y axis; bars start right of it.
    left: i64,
    /// First column right of the plot area.
    right: i64,
    /// Row of the highest tick.
    top: i64,
    /// Row of the x axis (value 0).
    bottom: i64,
    step: f64,
    ticks: usize,
    groups: usize,
    series: usize,
    /// Top-left corner of each series' legend swatch.
    legend: Vec<(i64, i64)>,
}

impl Frame {
    /// Row of value `v` (the top row of a bar of that height).
    fn y_of(&self, v: f64) -> i64 {
        let h = (self.bottom - self.top) as f64;
        self.bottom - (v / (self.step * self.ticks as f64) * h).round() as i64
    }

    /// Columns `[x0, x1)` of group `g`'s slot.
    fn slot(&self, g: usize) -> (f64, f64) {
        let w = (self.right - self.left - 1) as f64 / self.groups as f64;
        let x0 = (self.left + 1) as f64 + g as f64 * w;
        (x0, x0 + w)
    }

    /// Columns `[x0, x1)` of the bar of series `s` in group `g`.
    fn bar(&self, g: usize, s: usize) -> (i64, i64) {
        let (a, b) = self.slot(g);
        let pad = (b - a) * 0.12;
        let bw = (b - a - 2.0 * pad) / self.series.max(1) as f64;
        let x0 = (a + pad + s as f64 * bw).round() as i64;
        let mut x1 = (a + pad + (s + 1) as f64 * bw).round() as i64;
        if x1 - x0 >= 4 {
            x1 -= 1; // one blank column between neighbouring bars
        }
        (x0, x1.max(x0 + 1))
    }
}

impl BarChart {
    /// Renders the chart into a `width` x `height` image.
    pub fn render(&self, width: u32, height: u32) -> Result<Image, ChartError> {
        let f = self.frame(width, height)?;
        let mut img = Image::new(width, height, WHITE);

        let title_x = (width as i64 - text_width(&self.title, 2)) / 2;
        img.text(title_x, MARGIN, &self.title, 2, INK);
        for (i, (s, &(x, y))) in self.series.iter().zip(&f.legend).enumerate() {
            img.fill(x, y, x + SWATCH, y + SWATCH, color(i));
            img.text(x + SWATCH + 4, y + 1, &s.name, 1, INK);
        }
        for t in 1..=f.ticks {
            let y = f.y_of(t as f64 * f.step);
            img.fill(f.left + 1, y, f.right, y + 1, GRID);
        }

        for (s, series) in self.series.iter().enumerate() {
            for (g, &v) in series.values.iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                let (x0, x1) = f.bar(g, s);
                let y = f.y_of(v);
                img.fill(x0, y, x1, f.bottom, color(s));
                let label = compact(v);
                let lw = text_width(&label, 1);
                if lw <= x1 - x0 + 2 {
                    img.text((x0 + x1 - lw) / 2, y - 2 - GLYPH_H, &label, 1, INK);
                }
            }
        }

        img.fill(f.left, f.top, f.left + 1, f.bottom + 1, INK);
        img.fill(f.left, f.bottom, f.right, f.bottom + 1, INK);
        for t in 0..=f.ticks {
            let y = f.y_of(t as f64 * f.step);
            img.fill(f.left - 3, y, f.left, y + 1, INK);
            let label = compact(t as f64 * f.step);
            img.text(f.left - 5 - text_width(&label, 1), y - 3, &label, 1, INK);
        }
        let y_label_y = (f.top + f.bottom + text_width(&self.y_label, 1)) / 2;
        img.text_up(MARGIN, y_label_y, &self.y_label, 1, INK);

        for (g, name) in self.groups.iter().enumerate() {
            let (a, b) = f.slot(g);
            let fit = ((b - a + 1.0) / ADVANCE as f64).floor().max(1.0) as usize;
            let name: String = name.chars().take(fit).collect();
            let x = ((a + b) / 2.0).round() as i64 - text_width(&name, 1) / 2;
            img.text(x, f.bottom + 5, &name, 1, INK);
        }

        if let Some((label, v)) = &self.reference {
            let y = f.y_of(*v);
            for x in (f.left + 1..f.right).filter(|x| (x - f.left - 1) % 9 < 6) {
                img.put(x, y, REF_INK);
            }
            // Label above, value below the line's right end, kept on screen.
            let text_y = (y - GLYPH_H - 1).clamp(0, height as i64 - 2 * GLYPH_H - 6);
            img.text(f.right + 4, text_y, label, 1, REF_INK);
            img.text(f.right + 4, text_y + GLYPH_H + 4, &compact(*v), 1, REF_INK);
        }
        Ok(img)
    }

    /// Renders the chart and writes it as a PNG file.
    pub fn write_png(&self, path: &Path, width: u32, height: u32) -> Result<(), ChartError> {
        let bytes = self.render(width, height)?.encode_png()?;
        std::fs::write(path, bytes).map_err(|source| ChartError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Validates the chart and lays it out.
    fn frame(&self, width: u32, height: u32) -> Result<Frame, ChartError> {
        let too_small = ChartError::TooSmall { width, height };
        if width < MIN_W || height < MIN_H {
            return Err(too_small);
        }
        if self.groups.is_empty() {
            return Err(ChartError::NoGroups);
        }
        let mut max = 0.0f64;
        for s in &self.series {
            if s.values.len() != self.groups.len() {
                return Err(ChartError::SeriesLength {
                    series: s.name.clone(),
                    expected: self.groups.len(),
                    got: s.values.len(),
                });
            }
            for (g, &v) in s.values.iter().enumerate() {
                check(v, || {
                    format!("series {:?}, group {:?},", s.name, self.groups[g])
                })?;
                max = max.max(v); // f64::max ignores NaN
            }
        }
        if let Some((label, v)) = &self.reference {
            check(*v, || format!("reference {label:?}"))?;
            max = max.max(*v);
        }
        let (w, h) = (width as i64, height as i64);

        let mut top = MARGIN;
        if !self.title.is_empty() {
            top += 2 * GLYPH_H + 8;
        }
        // Legend entries (swatch, name) in rows, wrapped to the width, centered.
        let mut rows: Vec<(i64, Vec<(usize, i64)>)> = Vec::new();
        for (i, s) in self.series.iter().enumerate() {
            let item = SWATCH + 4 + text_width(&s.name, 1);
            match rows.last_mut() {
                Some((row_w, row)) if *row_w + LEGEND_GAP + item <= w - 2 * MARGIN => {
                    *row_w += LEGEND_GAP + item;
                    row.push((i, item));
                }
                _ => rows.push((item, vec![(i, item)])),
            }
        }
        let mut legend = vec![(0, 0); self.series.len()];
        for (row_w, row) in &rows {
            let mut x = (w - row_w) / 2;
            for &(i, item) in row {
                legend[i] = (x, top);
                x += item + LEGEND_GAP;
            }
            top += SWATCH + 5;
        }
        top += HEADROOM;

        let (step, ticks) = nice_axis(max);
        let tick_labels = (0..=ticks).map(|t| text_width(&compact(t as f64 * step), 1));
        let y_label_w = (GLYPH_H + 6) * i64::from(!self.y_label.is_empty());
        let left = MARGIN + y_label_w + tick_labels.max().unwrap_or(0) + 6;
        let gutter = self.reference.as_ref().map_or(0, |(label, v)| {
            let tw = text_width(label, 1).max(text_width(&compact(*v), 1));
            (tw + 6).min(w / 3)
        });
        let right = w - MARGIN - gutter;
        let bottom = h - MARGIN - GLYPH_H - 5;
        if right - left < 60 || bottom - top < 40 {
            return Err(too_small);
        }
        let (groups, series) = (self.groups.len(), self.series.len());
        Ok(Frame {
            left,
            right,
            top,
            bottom,
            step,
            ticks,
            groups,
            series,
            legend,
        })
    }
}

fn color(series: usize) -> [u8; 3] {
    PALETTE[series % PALETTE.len()]
}

/// Values must be finite and non-negative; NaN means "missing".
fn check(value: f64, what: impl FnOnce() -> String) -> Result<(), ChartError> {
    if value.is_nan() || (value.is_finite() && value >= 0.0) {
        return Ok(());
    }
    Err(ChartError::BadValue {
        what: what(),
        value,
    })
}

/// A "nice" tick step (1, 2, 2.5 or 5 x 10^k) and the number of steps
/// (3..=5, so 4-6 ticks counting 0) such that `step * steps >= max`.
fn nice_axis(max: f64) -> (f64, usize) {
    let max = if max > 0.0 { max } else { 1.0 };
    let mut mag = 10f64.powi(max.log10().floor() as i32 - 1);
    loop {
        for m in [1.0, 2.0, 2.5, 5.0] {
            let n = (max / (m * mag) - 1e-9).ceil().max(1.0);
            if n <= 5.0 {
                return (m * mag, n as usize);
            }
        }
        mag *= 10.0;
    }
}

/// Compact number with at most 3 significant digits: "0", "2.5", "10",
/// "1.25k", "3.4M", "1.5e-4".
fn compact(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    let q = 10f64.powi(v.abs().log10().floor() as i32 - 2);
    let r = (v / q).round() * q;
    if r.abs() < 1e-3 {
        let s = format!("{r:.2e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exp}", trim_zeros(mantissa));
    }
    let (div, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| r.abs() >= d)
        .unwrap_or((1.0, ""));
    let s = r / div;
    let decimals = (2 - s.abs().log10().floor() as i32).max(0) as usize;
    format!("{}{suffix}", trim_zeros(&format!("{s:.decimals$}")))
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: &[f64]) -> Series {
        Series {
            name: name.into(),
            values: values.to_vec(),
        }
    }

    fn chart(values: &[&[f64]], reference: Option<f64>) -> BarChart {
        let groups = values.first().map_or(0, |v| v.len());
        BarChart {
            title: "Throughput".into(),
            y_label: "GB/s".into(),
            groups: (0..groups).map(|g| format!("group{g}")).collect(),
            series: values
                .iter()
                .enumerate()
                .map(|(i, v)| series(&format!("s{i}"), v))
                .collect(),
            reference: reference.map(|r| ("ceiling".to_string(), r)),
        }
    }

    fn render(c: &BarChart, w: u32, h: u32) -> (Frame, Image) {
        (c.frame(w, h).unwrap(), c.render(w, h).unwrap())
    }

    /// Height of the run of colour `c` in column `x` going up from the axis.
    fn bar_height(img: &Image, x: i64, bottom: i64, c: [u8; 3]) -> i64 {
        let up = (1..=bottom).take_while(|d| img.pixel(x as u32, (bottom - d) as u32) == c);
        up.count() as i64
    }

    #[test]
    fn png_round_trips() {
        let c = chart(&[&[1.0, 2.5, 4.0], &[2.0, f64::NAN, 3.0]], Some(5.0));
        let img = c.render(320, 200).unwrap();
        let bytes = img.encode_png().unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width, info.height, info.color_type),
            (320, 200, png::ColorType::Rgb)
        );
        assert_eq!(&buf[..info.buffer_size()], &img.rgb[..]);
    }

    #[test]
    fn bar_heights_are_proportional() {
        let (f, img) = render(&chart(&[&[2.0, 4.0], &[1.0, 3.0]], None), 400, 300);
        assert!(
            img.rgb.chunks(3).any(|p| p == PALETTE[1]),
            "series colour missing"
        );
        let h = |g, s| {
            let (x0, x1) = f.bar(g, s);
            bar_height(&img, (x0 + x1) / 2, f.bottom, PALETTE[s])
        };
        let (h2, h4, h1, h3) = (h(0, 0), h(1, 0), h(0, 1), h(1, 1));
        assert!(h1 > 20, "bar too short: {h1}");
        assert!((h4 - 2 * h2).abs() <= 1, "{h2} vs {h4}");
        assert!((h3 - 3 * h1).abs() <= 2, "{h1} vs {h3}");
        // The axis tops out at a nice value >= the max: 4 = 4 steps of 1.
        assert_eq!((f.step, f.ticks, h4), (1.0, 4, f.bottom - f.top));
    }

    #[test]
    fn nan_bar_is_absent() {
        let (f, img) = render(&chart(&[&[2.0, f64::NAN, 3.0]], None), 400, 300);
        let (x0, x1) = f.bar(1, 0);
        for (x, y) in (x0..x1).flat_map(|x| (f.top..f.bottom).map(move |y| (x, y))) {
            assert_ne!(img.pixel(x as u32, y as u32), PALETTE[0], "at ({x}, {y})");
        }
        let (x0, x1) = f.bar(2, 0);
        let h = bar_height(&img, (x0 + x1) / 2, f.bottom, PALETTE[0]);
        assert_eq!(h, f.bottom - f.y_of(3.0));
    }

    #[test]
    fn reference_line_on_expected_row() {
        let (f, img) = render(&chart(&[&[2.0, 4.0]], Some(9.8)), 500, 300);
        // Axis 0..10: the line sits 98% of the way up the plot.
        let expected = f.bottom as f64 - 0.98 * (f.bottom - f.top) as f64;
        let dashes = |y: i64| {
            let on = |x: &i64| img.pixel(*x as u32, y as u32) == REF_INK;
            (f.left + 1..f.right).filter(on).count()
        };
        let rows: Vec<i64> = (f.top..=f.bottom).filter(|&y| dashes(y) > 20).collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!((rows[0] as f64 - expected).abs() <= 1.0, "{rows:?}");
        assert!(dashes(rows[0]) < (f.right - f.left) as usize * 3 / 4);
    }

    #[test]
    fn errors() {
        let err = |c: &BarChart, w, h| c.render(w, h).unwrap_err();
        let mut c = chart(&[&[1.0, 2.0], &[1.0]], None);
        assert!(matches!(
            err(&c, 400, 300),
            ChartError::SeriesLength { got: 1, .. }
        ));
        c.groups.clear();
        assert!(matches!(err(&c, 400, 300), ChartError::NoGroups));
        let c = chart(&[&[1.0]], None);
        assert!(matches!(err(&c, 199, 300), ChartError::TooSmall { .. }));
        assert!(matches!(err(&c, 400, 149), ChartError::TooSmall { .. }));
        for bad in [-1.0, f64::INFINITY, f64::NEG_INFINITY] {
            let e = err(&chart(&[&[1.0, bad]], None), 400, 300).to_string();
            assert!(e.contains("group \"group1\""), "{e}");
            let e = err(&chart(&[&[1.0]], Some(bad)), 400, 300);
            assert!(matches!(e, ChartError::BadValue { .. }));
        }
        // No series at all is fine: just axes and group labels.
        let mut c = chart(&[&[1.0]], None);
        c.series.clear();
        c.render(400, 300).unwrap();
    }

    #[test]
    fn every_glyph_draws_something() {
        for code in 32u8..=126 {
            let mut img = Image::new(8, 10, WHITE);
            img.text(1, 0, &(code as char).to_string(), 1, INK);
            let ink = img.rgb.chunks(3).filter(|p| *p == INK).count();
            assert_eq!(ink == 0, code == b' ', "{}", code as char);
        }
        assert_eq!(glyph('é'), [0x1f, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1f]);
        let spare_bits = 0xffe0_e0e0_e0e0_e0e0; // top byte and bits 5-7 of each row
        assert!(FONT.iter().all(|&g| g & spare_bits == 0));
    }

    /// Inclusive bounding box `[x0, y0, x1, y1]` of the ink in `img`.
    fn ink_box(img: &Image) -> [i64; 4] {
        let mut b = [i64::MAX, i64::MAX, 0, 0];
        for (x, y) in (0..img.height).flat_map(|y| (0..img.width).map(move |x| (x, y))) {
            if img.pixel(x, y) == INK {
                let (x, y) = (x as i64, y as i64);
                b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
            }
        }
        b
    }

    #[test]
    fn text_width_matches_drawing() {
        for (s, k) in [("HMW", 1), ("Hello World", 1), ("M", 2), ("H 2.5 GB/s%", 2)] {
            let mut img = Image::new(200, 30, WHITE);
            img.text(3, 2, s, k, INK);
            let b = ink_box(&img);
            assert_eq!(b, [3, 2, 2 + text_width(s, k), 1 + GLYPH_H * k], "{s:?}");
        }
        assert_eq!(text_width("", 2), 0);
        // Descenders hang two rows below the baseline; text_up is text turned.
        let (mut img, w) = (Image::new(40, 40, WHITE), text_width("Hgy", 1));
        img.text(1, 1, "Hgy", 1, INK);
        assert_eq!(ink_box(&img), [1, 1, w, GLYPH_H + 2]);
        let mut img = Image::new(40, 40, WHITE);
        img.text_up(1, 30, "Hgy", 1, INK);
        assert_eq!(ink_box(&img), [1, 31 - w, GLYPH_H + 2, 30]);
    }

    #[test]
    fn nice_ticks_and_compact_numbers() {
        assert_eq!(nice_axis(9.8), (2.0, 5));
        assert_eq!(nice_axis(12.0), (2.5, 5));
        assert_eq!(nice_axis(6.0), (2.0, 3));
        assert_eq!(nice_axis(0.0), (0.2, 5));
        let mut m = 0.013;
        while m < 1e7 {
            let (step, n) = nice_axis(m);
            let ok = (3..=5).contains(&n) && step * n as f64 >= m * (1.0 - 1e-9);
            assert!(ok, "{m}: {step} x {n}");
            m *= 1.37;
        }
        let values = [
            0.0, 2.5, 10.0, 1200.0, 12345.0, 999.7, 4.56789, 2.5e6, 7e9, 0.0125, 1.5e-4,
        ];
        let want = [
            "0", "2.5", "10", "1.2k", "12.3k", "1k", "4.57", "2.5M", "7G", "0.0125", "1.5e-4",
        ];
        for (v, s) in values.into_iter().zip(want) {
            assert_eq!(compact(v), s, "{v}");
        }
        assert_eq!(compact(0.1 + 0.2), "0.3");
    }

    #[test]
    #[ignore = "writes /tmp/chart-sample.png for a visual check"]
    fn sample_png() {
        let chart = BarChart {
            title: "KV block transfer bandwidth".into(),
            y_label: "GB/s".into(),
            groups: vec!["contiguous".into(), "random".into(), "fragmented".into()],
            series: vec![
                series("naive READ", &[7.9, 1.23, 0.41]),
                series("coalesced READ", &[9.31, 6.2, f64::NAN]),
                series("coalesced WRITE", &[9.05, 5.87, 3.3]),
            ],
            reference: Some(("memcpy ceiling".into(), 9.8)),
        };
        chart
            .write_png(Path::new("/tmp/chart-sample.png"), 800, 480)
            .unwrap();
    }
}

//! Benchmark charts, drawn with `plotters`: a grouped bar chart as SVG or
//! PNG, with a dashed reference line (a copy ceiling) and value labels.
//! Text uses DejaVu Sans (`fonts-dejavu-core`, which `scripts/setup`
//! installs) or the TrueType font `TANDEM_CHART_FONT` names; without one
//! the chart is not drawn and the error says why.
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
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Series colours (Okabe-Ito, black replaced by grey), colour-blind
/// friendly; series `i` uses `PALETTE[i % 8]`.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(110, 110, 110),
];
const REF_INK: RGBColor = RGBColor(150, 20, 20);
const FONT: &str = "sans-serif";
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

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
    /// Unit of the y axis, e.g. "GB/s".
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
    #[error("chart size {width}x{height} is too small (minimum 200x150)")]
    TooSmall { width: u32, height: u32 },
    #[error("{what} has invalid value {value} (must be finite and >= 0, or NaN for missing)")]
    BadValue { what: String, value: f64 },
    #[error("no font for chart text: {0}")]
    NoFont(String),
    /// Drawing or writing the file failed (plotters reports both).
    #[error("drawing the chart: {0}")]
    Draw(String),
}

/// Registers DejaVu Sans (or `TANDEM_CHART_FONT`) with plotters, once.
fn font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("TANDEM_CHART_FONT")
                .map(PathBuf::from)
                .into_iter()
                .chain(FONT_PATHS.iter().map(PathBuf::from))
                .collect();
            let (path, bytes) = candidates
                .iter()
                .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
                .ok_or_else(|| {
                    format!(
                        "none of {candidates:?} is readable (install fonts-dejavu-core or set \
                         TANDEM_CHART_FONT to a .ttf file)"
                    )
                })?;
            // plotters keeps the font for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| {
                format!(
                    "{} is not a TrueType font plotters can read",
                    path.display()
                )
            })
        })
        .clone()
        .map_err(ChartError::NoFont)
}

fn draw_err<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError::Draw(e.to_string())
}

impl BarChart {
    /// Checks the data; returns the top of the y axis.
    fn y_top(&self) -> Result<f64, ChartError> {
        if self.groups.is_empty() {
            return Err(ChartError::NoGroups);
        }
        let mut top: f64 = 0.0;
        for s in &self.series {
            if s.values.len() != self.groups.len() {
                return Err(ChartError::SeriesLength {
                    series: s.name.clone(),
                    expected: self.groups.len(),
                    got: s.values.len(),
                });
            }
            for &v in &s.values {
                if !v.is_nan() && (!v.is_finite() || v < 0.0) {
                    return Err(ChartError::BadValue {
                        what: format!("series {:?}", s.name),
                        value: v,
                    });
                }
                if v.is_finite() {
                    top = top.max(v);
                }
            }
        }
        if let Some((name, v)) = &self.reference {
            if !v.is_finite() || *v < 0.0 {
                return Err(ChartError::BadValue {
                    what: format!("reference {name:?}"),
                    value: *v,
                });
            }
            top = top.max(*v);
        }
        Ok(if top > 0.0 { top * 1.15 } else { 1.0 })
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), ChartError>
    where
        DB::ErrorType: 'static,
    {
        let top = self.y_top()?;
        let n = self.groups.len();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FONT, 20))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(self.y_label.as_str())
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(draw_err)?;
        let k = self.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let bars: Vec<(f64, f64, f64)> = s
                .values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(g, &v)| (g as f64 + 0.1 + i as f64 * width, v, width))
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x, v, w)| {
                    Rectangle::new([(x, 0.0), (x + w * 0.92, v)], color.filled())
                }))
                .map_err(draw_err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            // The value above each bar.
            chart
                .draw_series(bars.iter().map(|&(x, v, w)| {
                    Text::new(
                        short(v),
                        (x + w * 0.46, v + top * 0.01),
                        (FONT, 11)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(draw_err)?;
        }
        if let Some((name, v)) = &self.reference {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, *v), (n as f64, *v)],
                    8,
                    5,
                    REF_INK.stroke_width(2),
                ))
                .map_err(draw_err)?
                .label(format!("{name} {}", short(*v)))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], REF_INK.stroke_width(2)));
        }
        // Group names under the axis, centred on their bars (backend pixels made
        // relative to this area, which may be one column of a row).
        let (bx, by) = root.get_base_pixel();
        for (g, name) in self.groups.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            root.draw(&Text::new(
                name.as_str(),
                (px - bx, py - by + 8),
                (FONT, 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 12))
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)
    }

    fn check_size(width: u32, height: u32) -> Result<(), ChartError> {
        if width < 200 || height < 150 {
            return Err(ChartError::TooSmall { width, height });
        }
        Ok(())
    }

    /// The chart as an SVG document.
    pub fn svg(&self, width: u32, height: u32) -> Result<String, ChartError> {
        Self::check_size(width, height)?;
        font()?;
        let mut out = String::new();
        self.draw(SVGBackend::with_string(&mut out, (width, height)).into_drawing_area())?;
        Ok(out)
    }

    /// Renders a PNG to `path` (RGB, `width` x `height`).
    pub fn write_png(&self, path: &Path, width: u32, height: u32) -> Result<(), ChartError> {
        write_png_row(&[self], path, width, height)
    }
}

/// Several charts side by side in one PNG (each in an equal column).
pub fn write_png_row(
    charts: &[&BarChart],
    path: &Path,
    width: u32,
    height: u32,
) -> Result<(), ChartError> {
    if charts.is_empty() {
        return Err(ChartError::NoGroups);
    }
    BarChart::check_size(width / charts.len() as u32, height)?;
    font()?;
    for c in charts {
        c.y_top()?;
    }
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    for (c, area) in charts.iter().zip(root.split_evenly((1, charts.len()))) {
        c.draw(area)?;
    }
    root.present().map_err(draw_err)
}

/// A bar label: three significant figures, no exponent.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> BarChart {
        BarChart {
            title: "kvbench: 4096 tokens".into(),
            y_label: "GB/s".into(),
            groups: vec!["contiguous".into(), "random".into(), "fragmented".into()],
            series: vec![
                Series {
                    name: "naive READ".into(),
                    values: vec![504.0, 474.4, 503.7],
                },
                Series {
                    name: "blocks READ".into(),
                    values: vec![1816.4, f64::NAN, 1806.2],
                },
            ],
            reference: Some(("device-to-device copy".into(), 2056.8)),
        }
    }

    #[test]
    fn the_svg_names_everything_and_draws_each_bar() {
        let svg = chart().svg(960, 540).unwrap();
        for text in [
            "kvbench: 4096 tokens",
            "GB/s",
            "contiguous",
            "random",
            "fragmented",
            "naive READ",
            "blocks READ",
            "device-to-device copy 2057",
            "1816",
            "474",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Five bars (one value is missing) plus one legend swatch per series, in the
        // series colours.
        let blue = format!(
            "#{:02X}{:02X}{:02X}",
            PALETTE[0].0, PALETTE[0].1, PALETTE[0].2
        );
        let orange = format!(
            "#{:02X}{:02X}{:02X}",
            PALETTE[1].0, PALETTE[1].1, PALETTE[1].2
        );
        let count = |c: &str| svg.matches(&format!("fill=\"{c}\"")).count();
        assert_eq!(count(&blue), 3 + 1, "{svg}");
        assert_eq!(count(&orange), 2 + 1);
    }

    #[test]
    fn png_files_have_the_asked_size() {
        let path = std::env::temp_dir().join(format!("tandem-chart-{}.png", std::process::id()));
        chart().write_png(&path, 640, 360).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, after the 8-byte signature and 8-byte chunk head.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 640);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 360);
    }

    #[test]
    fn bad_data_is_an_error() {
        let mut c = chart();
        c.series[0].values.pop();
        assert!(matches!(
            c.svg(960, 540),
            Err(ChartError::SeriesLength { .. })
        ));
        let mut c = chart();
        c.series[1].values[0] = -1.0;
        assert!(matches!(c.svg(960, 540), Err(ChartError::BadValue { .. })));
        let mut c = chart();
        c.groups.clear();
        c.series.clear();
        assert!(matches!(c.svg(960, 540), Err(ChartError::NoGroups)));
        assert!(matches!(
            chart().svg(100, 100),
            Err(ChartError::TooSmall { .. })
        ));
        let path = std::env::temp_dir().join("tandem-chart-none.png");
        assert!(matches!(
            write_png_row(&[], &path, 800, 400),
            Err(ChartError::NoGroups)
        ));
    }

    #[test]
    fn a_row_of_charts_is_one_png() {
        let path = std::env::temp_dir().join(format!("tandem-row-{}.png", std::process::id()));
        write_png_row(&[&chart(), &chart()], &path, 1200, 400).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1200);
    }
}

//! Small line charts and heat maps drawn straight into an image (axes, ticks, legend) with the
//! grid's bitmap font: enough for training curves and confusion matrices, no font files needed.

use image::{Rgb, RgbImage};

use super::grid::draw_text;

const W: u32 = 480;
const H: u32 = 320;
const LEFT: u32 = 64;
const RIGHT: u32 = 28;
const TOP: u32 = 28;
const BOTTOM: u32 = 36;
const AXIS: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

pub const COLORS: [Rgb<u8>; 4] = [
    Rgb([31, 119, 180]),
    Rgb([214, 39, 40]),
    Rgb([44, 160, 44]),
    Rgb([148, 103, 189]),
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of `series` (colours in order of `COLORS`) with a title and an x-axis label.
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let px = |x: f64| LEFT as f64 + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (gx, gy) = (px(x0 + f * (x1 - x0)), py(y0 + f * (y1 - y0)));
        line(
            &mut img,
            (LEFT as f64, gy),
            ((W - RIGHT) as f64, gy),
            GRID,
            false,
        );
        line(
            &mut img,
            (gx, TOP as f64),
            (gx, (H - BOTTOM) as f64),
            GRID,
            false,
        );
        let ylab = tick(y0 + f * (y1 - y0));
        draw_text(
            &mut img,
            LEFT.saturating_sub(4 + 8 * ylab.len() as u32),
            gy as u32 - 4,
            &ylab,
            1,
        );
        let xlab = tick(x0 + f * (x1 - x0));
        draw_text(
            &mut img,
            (gx as u32).saturating_sub(4 * xlab.len() as u32),
            H - BOTTOM + 6,
            &xlab,
            1,
        );
    }
    line(
        &mut img,
        (LEFT as f64, TOP as f64),
        (LEFT as f64, (H - BOTTOM) as f64),
        AXIS,
        false,
    );
    line(
        &mut img,
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        AXIS,
        false,
    );
    draw_text(&mut img, LEFT, 8, title, 1);
    draw_text(
        &mut img,
        W / 2 - 4 * x_label.len() as u32,
        H - 14,
        x_label,
        1,
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], c, true);
        }
        for &(x, y) in &pts {
            square(&mut img, x, y, 2, c);
        }
        // Legend, top right.
        let ly = TOP + 6 + 12 * i as u32;
        let lx = W - RIGHT - 8 * s.name.len() as u32 - 20;
        square(&mut img, lx as f64 + 4.0, ly as f64 + 4.0, 3, c);
        draw_text(&mut img, lx + 12, ly, &s.name, 1);
    }
    img
}

/// Images side by side.
pub fn hconcat(images: &[RgbImage]) -> RgbImage {
    let w = images.iter().map(|i| i.width()).sum::<u32>().max(1);
    let h = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut x = 0;
    for i in images {
        image::imageops::replace(&mut out, i, x as i64, 0);
        x += i.width();
    }
    out
}

/// A confusion matrix (rows = true class, columns = predicted), each row shaded by its share.
pub fn confusion_matrix(counts: &[Vec<usize>], names: &[String]) -> RgbImage {
    let n = counts.len() as u32;
    let cell = if n <= 20 { 36 } else { 12 };
    let label_w = if n <= 20 {
        names.iter().map(|s| s.len().min(16)).max().unwrap_or(1) as u32 * 8 + 8
    } else {
        8
    };
    let (w, h) = (label_w + n * cell + 8, 24 + n * cell + 8);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    draw_text(&mut img, label_w, 6, "predicted ->  (rows: true class)", 1);
    for (r, row) in counts.iter().enumerate() {
        let total: usize = row.iter().sum();
        if n <= 20 {
            let name: String = names[r].chars().take(16).collect();
            draw_text(&mut img, 4, 24 + r as u32 * cell + cell / 2 - 4, &name, 1);
        }
        for (c, &v) in row.iter().enumerate() {
            let f = if total > 0 {
                v as f64 / total as f64
            } else {
                0.0
            };
            let shade = (255.0 * (1.0 - f)) as u8;
            let color = Rgb([shade, shade, 255]);
            let (x, y) = (label_w + c as u32 * cell, 24 + r as u32 * cell);
            for dy in 1..cell {
                for dx in 1..cell {
                    img.put_pixel(x + dx, y + dy, color);
                }
            }
            if n <= 20 {
                let text = v.to_string();
                let ink = if f > 0.5 {
                    Rgb([255, 255, 255])
                } else {
                    Rgb([20, 20, 20])
                };
                draw_text_color(
                    &mut img,
                    x + cell / 2 - 4 * text.len() as u32,
                    y + cell / 2 - 4,
                    &text,
                    ink,
                );
            }
        }
    }
    img
}

fn draw_text_color(img: &mut RgbImage, x: u32, y: u32, text: &str, ink: Rgb<u8>) {
    // draw_text uses dark ink; light ink on dark cells is drawn by recolouring afterwards.
    let mut tmp = RgbImage::from_pixel(8 * text.len() as u32, 8, Rgb([255, 255, 255]));
    draw_text(&mut tmp, 0, 0, text, 1);
    for (dx, dy, p) in tmp.enumerate_pixels() {
        if p[0] < 128 && x + dx < img.width() && y + dy < img.height() {
            img.put_pixel(x + dx, y + dy, ink);
        }
    }
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 || (a > 0.0 && a < 0.01) {
        format!("{v:.1e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn square(img: &mut RgbImage, x: f64, y: f64, r: i64, c: Rgb<u8>) {
    for dy in -r..=r {
        for dx in -r..=r {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

/// A straight line, one pixel wide or (`thick`) two.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>, thick: bool) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
        square(img, x, y, 0, c);
        if thick {
            square(img, x + 1.0, y, 0, c);
            square(img, x, y + 1.0, 0, c);
        }
    }
}

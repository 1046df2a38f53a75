//! Pathfinder and Path-X, generated: Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal gated recurrent units"; Tay et al. 2021, "Long Range Arena" (LRA).
//!
//! Each image holds two marked dots and several dashed curved paths; label 1 means the two
//! dots are joined by one path. The image is flattened row-major into a pixel sequence
//! (ids = gray value 0–255, vocabulary 256, two classes).
//!
//! Generator (a re-implementation in the spirit of Linsley's, not his code):
//! - A path is a random walk of short straight *dashes* separated by *gaps*: each dash turns
//!   from the previous heading by a uniform angle in `±max_turn`; dash length, gap length,
//!   line width, dot radius and path length scale with the image size (see [`Params`]).
//!   Dashes stay inside the image (margin = dot radius + ½ px), keep `clearance` from every
//!   other path's dashes (no crossings or touching, so connectivity is visible), and keep
//!   `dot_radius + half_width + 1` px from every target end, so a dot never touches a line.
//!   Rendering is anti-aliased (pixel coverage of the thick segment / disc), except at the
//!   lite sizes (12, 16 px: [`Params::crisp`]), which are also easier: 2 ± 1 dashes, no
//!   distractors, so that the lite model learns them within its budget (see
//!   `docs/experiments/arena-lite-tasks.md`).
//! - Every sample has two target paths A (path 0) and B (path 1) of the same length
//!   (`path_dashes` ± 1 dashes, drawn once per sample), plus distractors: short paths of
//!   `distractor_dashes` dashes drawn exactly like target paths (same dash, gap, width, gray).
//! - The first dot sits on a random end of A. B is started at a point whose distance from
//!   the first dot equals the distance between A's two ends, so the distance between the two
//!   dots has the same distribution in both classes. The second dot sits on the other end of
//!   A (label 1) or on that end of B (label 0).
//! - The label is a fair coin drawn first from the example's generator (the first of
//!   `task::attempts(seed, split, index)` whose image belongs to the split: the splits never
//!   share an image); the geometry comes from a fork of that generator, so for a given
//!   (split, index) the paths are identical whichever label the coin gives — the classes
//!   differ only in where the second dot is. [`Pathfinder::scene_with_label`] builds both
//!   versions. Training draws fresh images every step.
//!
//! Splits: LRA split each Pathfinder data set 80/10/10 (`[:80%]`, `[80%:90%]`, `[90%:]` in
//! `lra_benchmarks/image/input_pipeline.py`); with the released 200k images per set that is
//! 160,000 / 20,000 / 20,000 (`Full`). `Lite` is 5,000 / 500 / 1,000.
//!
//! Files: LRA released Pathfinder as PNG images plus metadata, not TSV. `write_tsv` writes a
//! header `Target\tPixels` and one row per image: `label\tp0 p1 ... pN` (gray values,
//! row-major, space-separated).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use formers::rng::Rng;

use crate::task::{attempts, split_of_content, ArenaTask, Example, Setting, Split};

/// Image sizes the generator supports.
pub const SIZES: [usize; 5] = [12, 16, 32, 64, 128];

/// A point in pixel coordinates: pixel (x, y) covers `[x, x+1) × [y, y+1)`.
type Pt = (f64, f64);

/// Generator parameters for one image size (lengths in pixels, angles in radians).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Length of one straight dash.
    pub dash: f64,
    /// Gap between consecutive dashes.
    pub gap: f64,
    /// Half the line width.
    pub half_width: f64,
    /// Radius of the two marker dots.
    pub dot_radius: f64,
    /// Dashes per target path: drawn once per sample as this ± 1 and shared by A and B;
    /// rejection of layouts that do not fit favours the shorter draws.
    pub path_dashes: usize,
    /// Distractor paths attempted per image.
    pub distractors: usize,
    /// Dashes per distractor path.
    pub distractor_dashes: usize,
    /// Largest turn between consecutive dashes.
    pub max_turn: f64,
    /// Least distance between dashes of different paths (centre lines).
    pub clearance: f64,
    /// Gray value of path pixels (dots are 255).
    pub path_gray: u8,
    /// Crisp pixels (background, line or dot) instead of anti-aliased coverage.
    pub crisp: bool,
}

impl Params {
    /// The parameters for `size` (12 and 16 share the lite ones; 32, 64, 128; other sizes
    /// use the nearest of these).
    pub fn for_size(size: usize) -> Params {
        match size {
            0..=23 => Params {
                dash: 2.0,
                gap: 0.8,
                half_width: 0.5,
                dot_radius: 1.1,
                path_dashes: 2,
                distractors: 0,
                distractor_dashes: 2,
                max_turn: 0.6,
                clearance: 2.5,
                path_gray: 170,
                crisp: true,
            },
            24..=47 => Params {
                dash: 2.5,
                gap: 2.0,
                half_width: 0.5,
                dot_radius: 1.5,
                path_dashes: 7,
                distractors: 5,
                distractor_dashes: 3,
                max_turn: 0.55,
                clearance: 2.2,
                path_gray: 170,
                crisp: false,
            },
            48..=95 => Params {
                dash: 4.0,
                gap: 2.5,
                half_width: 0.75,
                dot_radius: 2.5,
                path_dashes: 10,
                distractors: 9,
                distractor_dashes: 4,
                max_turn: 0.5,
                clearance: 3.0,
                path_gray: 170,
                crisp: false,
            },
            _ => Params {
                dash: 6.0,
                gap: 3.0,
                half_width: 1.0,
                dot_radius: 3.2,
                path_dashes: 14,
                distractors: 14,
                distractor_dashes: 5,
                max_turn: 0.45,
                clearance: 4.0,
                path_gray: 170,
                crisp: false,
            },
        }
    }

    /// Least distance from a dot centre (a target end) to any other path's dash.
    fn end_clearance(&self) -> f64 {
        self.dot_radius + self.half_width + 1.0
    }
}

/// One sample's path graph: the dashes of every path and where the two dots sit.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Image side in pixels.
    pub size: usize,
    /// Per path, its dashes as consecutive point pairs: dash `k` runs from `path[2k]` to
    /// `path[2k+1]`. The path's end 0 is `path[0]`, end 1 is its last point. Paths 0 and 1
    /// are the targets A and B, the rest distractors.
    pub paths: Vec<Vec<(f64, f64)>>,
    /// The two dots as (path id, end 0 or 1).
    pub dots: [(usize, usize); 2],
    /// 1 when the dots are on the same path.
    pub label: u32,
}

impl Scene {
    /// End `end` (0 or 1) of path `path`, if both exist.
    pub fn end_point(&self, path: usize, end: usize) -> Option<(f64, f64)> {
        let pts = self.paths.get(path)?;
        match end {
            0 => pts.first().copied(),
            1 => pts.last().copied(),
            _ => None,
        }
    }

    /// The centres of the two dots, if both name existing path ends.
    pub fn dot_centres(&self) -> Option<[(f64, f64); 2]> {
        let a = self.end_point(self.dots[0].0, self.dots[0].1)?;
        let b = self.end_point(self.dots[1].0, self.dots[1].1)?;
        Some([a, b])
    }
}

/// Whether the two dots are joined by one path, read from the path graph alone (both dots
/// on the same path), not from `scene.label`.
pub fn connected(scene: &Scene) -> bool {
    scene.dots[0].0 == scene.dots[1].0
}

/// The image of `scene`: `size²` gray values, row-major.
pub fn render(scene: &Scene) -> Vec<u8> {
    let n = scene.size;
    let p = Params::for_size(n);
    let mut img = vec![0.0f64; n * n];
    let gray = f64::from(p.path_gray) / 255.0;
    for path in &scene.paths {
        for pair in path.chunks_exact(2) {
            stamp(&mut img, n, pair[0], pair[1], p.half_width, gray);
        }
    }
    if let Some(centres) = scene.dot_centres() {
        for c in centres {
            stamp(&mut img, n, c, c, p.dot_radius, 1.0);
        }
    }
    let crisp = |v: f64| match v {
        v if v >= 0.8 => 255,
        v if v >= 0.3 * gray => p.path_gray,
        _ => 0,
    };
    img.iter()
        .map(|&v| match p.crisp {
            // Background, line or dot: a pixel a third covered by a line is line; a dot
            // is the pixels it covers to 80%, which always includes the pixel holding its
            // centre (covered at least to 1.1 + ½ − √½ ≈ 89%).
            true => crisp(v),
            false => (v.clamp(0.0, 1.0) * 255.0).round() as u8,
        })
        .collect()
}

/// Paints the thick segment `a`–`b` (a disc when `a == b`) with anti-aliased coverage,
/// keeping the brighter of old and new value per pixel.
fn stamp(img: &mut [f64], n: usize, a: Pt, b: Pt, half_width: f64, value: f64) {
    let reach = half_width + 1.0;
    let lo = |u: f64| (u - reach).floor().max(0.0) as usize;
    let hi = |u: f64| ((u + reach).ceil().max(0.0) as usize).min(n);
    for y in lo(a.1.min(b.1))..hi(a.1.max(b.1)) {
        for x in lo(a.0.min(b.0))..hi(a.0.max(b.0)) {
            let d = point_segment((x as f64 + 0.5, y as f64 + 0.5), a, b);
            let v = (half_width + 0.5 - d).clamp(0.0, 1.0) * value;
            let px = &mut img[y * n + x];
            *px = px.max(v);
        }
    }
}

fn dist(a: Pt, b: Pt) -> f64 {
    (a.0 - b.0).hypot(a.1 - b.1)
}

/// Distance from `q` to the segment `a`–`b`.
fn point_segment(q: Pt, a: Pt, b: Pt) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    if len2 == 0.0 {
        return dist(q, a);
    }
    let t = (((q.0 - a.0) * dx + (q.1 - a.1) * dy) / len2).clamp(0.0, 1.0);
    dist(q, (a.0 + t * dx, a.1 + t * dy))
}

fn cross(o: Pt, a: Pt, b: Pt) -> f64 {
    (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
}

/// Distance between segments `a`–`b` and `c`–`d` (0 when they cross).
fn segment_segment(a: Pt, b: Pt, c: Pt, d: Pt) -> f64 {
    let crosses = cross(a, b, c) * cross(a, b, d) < 0.0 && cross(c, d, a) * cross(c, d, b) < 0.0;
    if crosses {
        return 0.0;
    }
    point_segment(a, c, d)
        .min(point_segment(b, c, d))
        .min(point_segment(c, a, b))
        .min(point_segment(d, a, b))
}

/// A placed dash: its ends, its path and its index on that path.
struct Dash {
    a: Pt,
    b: Pt,
    path: usize,
    k: usize,
}

/// The scene under construction: placed dashes and the protected target ends.
struct Canvas {
    p: Params,
    size: f64,
    dashes: Vec<Dash>,
    /// Target ends (possible dot centres) and the path each belongs to.
    ends: Vec<(Pt, usize)>,
}

impl Canvas {
    fn new(size: usize) -> Canvas {
        Canvas {
            p: Params::for_size(size),
            size: size as f64,
            dashes: Vec::new(),
            ends: Vec::new(),
        }
    }

    fn inside(&self, q: Pt) -> bool {
        let m = self.p.dot_radius + 0.5;
        q.0 >= m && q.1 >= m && q.0 <= self.size - m && q.1 <= self.size - m
    }

    /// Whether dash `k` of `path` may run from `a` to `b`.
    fn free(&self, a: Pt, b: Pt, path: usize, k: usize) -> bool {
        let near_dashes = self.dashes.iter().any(|d| {
            let own_neighbour = d.path == path && k <= d.k + 1;
            !own_neighbour && segment_segment(a, b, d.a, d.b) < self.p.clearance
        });
        let near_ends = self.ends.iter().any(|&(q, owner)| {
            let own_start = owner == path && k <= 2;
            !own_start && point_segment(q, a, b) < self.p.end_clearance()
        });
        self.inside(a) && self.inside(b) && !near_dashes && !near_ends
    }

    /// Whether a dot at `q`, the end of `path` whose last dash is `last`, keeps clear of
    /// every other dash.
    fn end_free(&self, q: Pt, path: usize, last: usize) -> bool {
        !self.dashes.iter().any(|d| {
            let own_neighbour = d.path == path && d.k + 2 >= last;
            !own_neighbour && point_segment(q, d.a, d.b) < self.p.end_clearance()
        })
    }

    /// Grows `n` dashes of `path` from `start` with initial heading `heading`; on success
    /// the dashes stay placed and the points are returned, otherwise nothing is placed.
    fn grow(
        &mut self,
        rng: &mut Rng,
        start: Pt,
        heading: f64,
        n: usize,
        path: usize,
    ) -> Option<Vec<Pt>> {
        let mut pts = Vec::with_capacity(2 * n);
        let (mut pos, mut h) = (start, heading);
        for k in 0..n {
            let Some((a, b, h2)) = self.next_dash(rng, pos, h, k, path) else {
                self.dashes.retain(|d| d.path != path);
                return None;
            };
            self.dashes.push(Dash { a, b, path, k });
            pts.extend([a, b]);
            (pos, h) = (b, h2);
        }
        Some(pts)
    }

    /// Tries a few turns for dash `k` after a dash ending at `pos` with heading `h`.
    fn next_dash(
        &self,
        rng: &mut Rng,
        pos: Pt,
        h: f64,
        k: usize,
        path: usize,
    ) -> Option<(Pt, Pt, f64)> {
        let tries = if k == 0 { 1 } else { 12 };
        for _ in 0..tries {
            let turn = if k == 0 { 0.0 } else { self.p.max_turn };
            let h2 = h + (2.0 * rng.uniform() - 1.0) * turn;
            let (c, s) = (h2.cos(), h2.sin());
            let skip = if k == 0 { 0.0 } else { self.p.gap };
            let a = (pos.0 + skip * c, pos.1 + skip * s);
            let b = (a.0 + self.p.dash * c, a.1 + self.p.dash * s);
            if self.free(a, b, path, k) {
                return Some((a, b, h2));
            }
        }
        None
    }

    /// A random point inside the margin.
    fn random_point(&self, rng: &mut Rng) -> Pt {
        let m = self.p.dot_radius + 0.5;
        let span = (self.size - 2.0 * m).max(0.0);
        (m + rng.uniform() * span, m + rng.uniform() * span)
    }

    /// Grows a target path from `start`, first dash along `heading`, and protects both ends.
    fn target(
        &mut self,
        rng: &mut Rng,
        start: Pt,
        heading: f64,
        n: usize,
        path: usize,
    ) -> Option<Vec<Pt>> {
        if !self.inside(start) || !self.end_free(start, path, 0) {
            return None;
        }
        self.ends.push((start, path));
        let grown = self
            .grow(rng, start, heading, n, path)
            .filter(|pts| pts.last().is_some_and(|&q| self.end_free(q, path, n - 1)));
        match grown {
            Some(pts) => {
                self.ends.extend(pts.last().map(|&q| (q, path)));
                Some(pts)
            }
            None => {
                self.dashes.retain(|d| d.path != path);
                self.ends.retain(|&(_, owner)| owner != path);
                None
            }
        }
    }
}

/// The label-independent part of a sample: paths and the two candidate second-dot ends.
struct Layout {
    paths: Vec<Vec<Pt>>,
    /// The first dot: (path 0, end).
    first: (usize, usize),
    /// Second dot when connected: the other end of path 0.
    same: (usize, usize),
    /// Second dot when not connected: an end of path 1.
    other: (usize, usize),
}

/// Target path length in dashes: `path_dashes` ± 1 (the same for A and B).
fn target_len(rng: &mut Rng, p: &Params) -> usize {
    (p.path_dashes + rng.below(3)).saturating_sub(1).max(1)
}

/// Direction of the vector `from` → `to`.
fn angle(from: Pt, to: Pt) -> f64 {
    (to.1 - from.1).atan2(to.0 - from.0)
}

/// One try at the two target paths, both of the same number of dashes (`shrink` fewer
/// than drawn), so path length never tells A from B.
///
/// B starts at a point as far from A's first end `a0` as A's other end `a1` is, and its
/// first dash makes the same angle (mirrored at random) with the line to `a0` as A's last
/// dash, seen from `a1`. So the second dot's distance to the first and the direction its
/// path leaves in are distributed alike whichever end gets it.
fn try_targets(rng: &mut Rng, cv: &mut Canvas, shrink: usize) -> Option<(Vec<Pt>, Vec<Pt>)> {
    let p = cv.p;
    let n = target_len(rng, &p).saturating_sub(shrink).max(1);
    let start = cv.random_point(rng);
    let heading = rng.uniform() * std::f64::consts::TAU;
    let a = cv.target(rng, start, heading, n, 0)?;
    let (a0, a1, inward) = (a[0], a[a.len() - 1], a[a.len() - 2]);
    let reach = dist(a0, a1);
    let offset = angle(a1, inward) - angle(a1, a0);
    for _ in 0..40 {
        let t = rng.uniform() * std::f64::consts::TAU;
        let b0 = (a0.0 + reach * t.cos(), a0.1 + reach * t.sin());
        let mirror = if rng.below(2) == 0 { 1.0 } else { -1.0 };
        let heading = angle(b0, a0) + mirror * offset;
        if let Some(b) = cv.target(rng, b0, heading, n, 1) {
            return Some((a, b));
        }
    }
    None
}

/// Adds up to `p.distractors` distractor paths (ids from 2); returns their points.
fn add_distractors(rng: &mut Rng, cv: &mut Canvas) -> Vec<Vec<Pt>> {
    let p = cv.p;
    let mut out = Vec::new();
    for _ in 0..p.distractors {
        let id = 2 + out.len();
        for _ in 0..40 {
            let start = cv.random_point(rng);
            let heading = rng.uniform() * std::f64::consts::TAU;
            if let Some(pts) = cv.grow(rng, start, heading, p.distractor_dashes, id) {
                out.push(pts);
                break;
            }
        }
    }
    out
}

/// Scene attempts before the target paths are shortened by one dash.
const TRIES_PER_LENGTH: usize = 100;

/// The paths of one sample, drawn from `rng` alone (never from the label).
fn layout(rng: &mut Rng, size: usize) -> Layout {
    let shrinks = Params::for_size(size).path_dashes;
    for attempt in 0..(TRIES_PER_LENGTH * shrinks) {
        let mut cv = Canvas::new(size);
        if let Some((mut a, mut b)) = try_targets(rng, &mut cv, attempt / TRIES_PER_LENGTH) {
            let mut paths = add_distractors(rng, &mut cv);
            // Random orientation, so the dotted end is not always end 0.
            let (ea, eb) = (rng.below(2), rng.below(2));
            if ea == 1 {
                a.reverse();
            }
            if eb == 1 {
                b.reverse();
            }
            paths.splice(0..0, [a, b]);
            return Layout {
                paths,
                first: (0, ea),
                same: (0, 1 - ea),
                other: (1, eb),
            };
        }
    }
    fallback_layout(size)
}

/// A fixed, valid layout for a sample whose random tries all failed (measured: 2.5% of
/// 2,000 lite 12 px images, whose paths fill more of the image).
fn fallback_layout(size: usize) -> Layout {
    let s = size as f64;
    let dash = Params::for_size(size).dash;
    let at = |y: f64| vec![(0.3 * s, y * s), (0.3 * s + dash, y * s)];
    Layout {
        paths: vec![at(0.3), at(0.7)],
        first: (0, 0),
        same: (0, 1),
        other: (1, 0),
    }
}

/// The Pathfinder (or Path-X) task.
#[derive(Debug, Clone)]
pub struct Pathfinder {
    name: &'static str,
    setting: Setting,
    seed: u64,
    size: usize,
}

impl Pathfinder {
    /// Pathfinder with `size × size` images (12, 16, 32, 64 or 128); 128 is named `pathx`.
    pub fn new(setting: Setting, seed: u64, size: usize) -> Result<Pathfinder, String> {
        let name = if size == 128 { "pathx" } else { "pathfinder" };
        Pathfinder::named(name, setting, seed, size)
    }

    /// `pathfinder` (12 px lite, 32 px full) or `pathx` (32 px lite, 128 px full).
    pub fn for_task(name: &str, setting: Setting, seed: u64) -> Result<Pathfinder, String> {
        match (name, setting) {
            ("pathfinder", Setting::Lite) => Pathfinder::named("pathfinder", setting, seed, 12),
            ("pathfinder", Setting::Full) => Pathfinder::named("pathfinder", setting, seed, 32),
            ("pathx", Setting::Lite) => Pathfinder::named("pathx", setting, seed, 32),
            ("pathx", Setting::Full) => Pathfinder::named("pathx", setting, seed, 128),
            _ => Err(format!(
                "unknown Pathfinder task {name:?} (pathfinder, pathx)"
            )),
        }
    }

    fn named(
        name: &'static str,
        setting: Setting,
        seed: u64,
        size: usize,
    ) -> Result<Pathfinder, String> {
        if !SIZES.contains(&size) {
            return Err(format!(
                "Pathfinder size {size} unsupported (12, 16, 32, 64, 128)"
            ));
        }
        Ok(Pathfinder {
            name,
            setting,
            seed,
            size,
        })
    }

    /// Image side in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The generator parameters of this task's size.
    pub fn params(&self) -> Params {
        Params::for_size(self.size)
    }

    /// Example `index` of `split` as drawn: the generator of the first of its [`attempts`]
    /// whose image belongs to `split` ([`split_of_content`], so the splits never share an
    /// image), that attempt's scene, and the scene's pixels as input ids.
    fn drawn(&self, split: Split, index: usize) -> (Rng, Scene, Vec<u32>) {
        attempts(self.seed, split, index)
            .map(|rng| {
                let scene = self.scene_from(rng.clone(), None);
                let ids: Vec<u32> = render(&scene).into_iter().map(u32::from).collect();
                (rng, scene, ids)
            })
            .find(|(_, _, ids)| split_of_content(ids) == split)
            .expect("the attempts never end")
    }

    /// The label of example `index` of `split` (a fair coin).
    pub fn label(&self, split: Split, index: usize) -> u32 {
        self.scene(split, index).label
    }

    /// The scene of example `index` of `split`.
    pub fn scene(&self, split: Split, index: usize) -> Scene {
        self.drawn(split, index).1
    }

    /// The scene of example `index` of `split` drawn with `label` (1 = connected, any other
    /// value = not) instead of its coin: the paths are the same for both labels.
    pub fn scene_with_label(&self, split: Split, index: usize, label: u32) -> Scene {
        self.scene_from(self.drawn(split, index).0, Some(label))
    }

    /// The scene drawn from `rng`: its coin first (the label unless `label` is given), then
    /// the geometry from a fork.
    fn scene_from(&self, mut rng: Rng, label: Option<u32>) -> Scene {
        let coin = rng.below(2) as u32;
        let mut geometry = rng.fork(0x9a7f);
        let lay = layout(&mut geometry, self.size);
        let label = u32::from(label.unwrap_or(coin) == 1);
        let second = if label == 1 { lay.same } else { lay.other };
        Scene {
            size: self.size,
            paths: lay.paths,
            dots: [lay.first, second],
            label,
        }
    }
}

impl ArenaTask for Pathfinder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn source(&self) -> String {
        let mut s = format!(
            "generated Pathfinder {0}x{0} (Linsley et al. 2018 style), seed {1}",
            self.size, self.seed
        );
        if self.name == "pathx" && self.size != 128 {
            s.push_str("; Path-X lite uses 32 px instead of LRA's 128 px to stay feasible");
        }
        s
    }

    fn n_classes(&self) -> usize {
        2
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn max_len(&self) -> usize {
        self.size * self.size
    }

    fn generated(&self) -> bool {
        true
    }

    fn grid_width(&self) -> Option<usize> {
        Some(self.size)
    }

    fn len(&self, split: Split) -> usize {
        match (self.setting, split) {
            (Setting::Full, Split::Train) => 160_000,
            (Setting::Full, _) => 20_000,
            (Setting::Lite, Split::Train) => 5_000,
            (Setting::Lite, Split::Val) => 500,
            (Setting::Lite, Split::Test) => 1_000,
        }
    }

    fn example(&self, split: Split, index: usize) -> Example {
        // The pixels the split check rendered are the example's: no second rendering.
        let (_, scene, ids) = self.drawn(split, index);
        Example::new(ids, scene.label)
    }

    /// `Target\tPixels` header, then `label\tp0 p1 ... pN` per image (row-major gray).
    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "Target\tPixels")?;
        for i in 0..n.min(self.len(split)) {
            let ex = self.example(split, i);
            let pixels: Vec<String> = ex.ids.iter().map(u32::to_string).collect();
            writeln!(out, "{}\t{}", ex.label, pixels.join(" "))?;
        }
        Ok(())
    }
}

/// Grid layout: border of each tile, gap between tiles, background gray.
const FRAME: usize = 2;
const GAP: usize = 4;
const BACKGROUND: [u8; 3] = [48, 48, 48];

/// Writes `images` (gray, `size²` each, with labels) as an RGB PNG grid with `cols`
/// columns, scaled up by nearest neighbour (to about 128 px per tile), each tile framed
/// green for label 1 and red for label 0.
pub fn write_grid_png(
    path: &Path,
    images: &[(Vec<u8>, u32)],
    size: usize,
    cols: usize,
) -> io::Result<()> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if images.is_empty() || size == 0 {
        return Err(invalid("no images to draw".into()));
    }
    if let Some((img, _)) = images.iter().find(|(img, _)| img.len() != size * size) {
        return Err(invalid(format!(
            "image of {} pixels, expected {}",
            img.len(),
            size * size
        )));
    }
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let scale = (128 / size).max(1);
    let tile = size * scale + 2 * FRAME;
    let (w, h) = (cols * (tile + GAP) + GAP, rows * (tile + GAP) + GAP);
    let mut rgb = BACKGROUND.repeat(w * h);
    for (i, (img, label)) in images.iter().enumerate() {
        let origin = (
            GAP + (i % cols) * (tile + GAP),
            GAP + (i / cols) * (tile + GAP),
        );
        draw_tile(&mut rgb, w, origin, img, size, scale, *label);
    }
    let file = BufWriter::new(File::create(path)?);
    let mut enc = png::Encoder::new(file, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(io::Error::other)?;
    writer.write_image_data(&rgb).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

/// Draws one framed, scaled tile with its top-left corner at `origin`.
fn draw_tile(
    rgb: &mut [u8],
    w: usize,
    origin: (usize, usize),
    img: &[u8],
    size: usize,
    scale: usize,
    label: u32,
) {
    let frame = if label == 1 {
        [40, 200, 60]
    } else {
        [220, 50, 50]
    };
    let tile = size * scale + 2 * FRAME;
    for ty in 0..tile {
        for tx in 0..tile {
            let inner = (FRAME..tile - FRAME).contains(&tx) && (FRAME..tile - FRAME).contains(&ty);
            let color = if inner {
                let g = img[((ty - FRAME) / scale) * size + (tx - FRAME) / scale];
                [g, g, g]
            } else {
                frame
            };
            let at = 3 * ((origin.1 + ty) * w + origin.0 + tx);
            rgb[at..at + 3].copy_from_slice(&color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite(size: usize) -> Pathfinder {
        Pathfinder::new(Setting::Lite, 3, size).unwrap()
    }

    #[test]
    fn labels_are_balanced() {
        let t = Pathfinder::for_task("pathfinder", Setting::Lite, 0).unwrap();
        let ones: u32 = (0..2000).map(|i| t.example(Split::Train, i).label).sum();
        let share = f64::from(ones) / 2000.0;
        assert!((0.45..=0.55).contains(&share), "label-1 share {share}");
    }

    #[test]
    fn connectivity_matches_label() {
        let lite_task = Pathfinder::for_task("pathfinder", Setting::Lite, 0).unwrap();
        for t in [lite(32), lite_task] {
            for i in 0..200 {
                let s = t.scene(Split::Train, i);
                assert_eq!(connected(&s), s.label == 1, "index {i}");
            }
        }
    }

    #[test]
    fn lite_images_are_crisp_and_rarely_the_fallback() {
        let t = Pathfinder::for_task("pathfinder", Setting::Lite, 0).unwrap();
        assert_eq!(t.size(), 12);
        let gray = u32::from(t.params().path_gray);
        let images: Vec<Vec<u32>> = (0..400).map(|i| t.example(Split::Train, i).ids).collect();
        assert!(images.iter().all(|ids| ids.len() == 144));
        // Background, line or dot only; both dots lit.
        for ids in &images {
            assert!(ids.iter().all(|&v| v == 0 || v == gray || v == 255));
            assert!(ids.iter().filter(|&&v| v == 255).count() >= 2);
        }
        // The fixed layout for a scene that never fit stays rare (measured 2.5% at 12 px).
        let fixed = fallback_layout(12).paths;
        let fallback = (0..400)
            .filter(|&i| t.scene(Split::Train, i).paths == fixed)
            .count();
        assert!(
            fallback < 20,
            "{fallback} of 400 images are the fallback layout"
        );
    }

    #[test]
    fn labels_differ_only_in_the_second_dot() {
        let t = lite(32);
        let r = t.params().dot_radius + 1.0;
        for i in 0..100 {
            let neg = t.scene_with_label(Split::Val, i, 0);
            let pos = t.scene_with_label(Split::Val, i, 1);
            assert_eq!(neg.paths, pos.paths);
            assert_eq!(neg.dots[0], pos.dots[0]);
            assert!(!connected(&neg) && connected(&pos));
            let centres: Vec<Pt> = [&neg, &pos]
                .iter()
                .flat_map(|s| s.dot_centres().unwrap())
                .collect();
            let (a, b) = (render(&neg), render(&pos));
            for (j, _) in a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x != y) {
                let q = ((j % 32) as f64 + 0.5, (j / 32) as f64 + 0.5);
                assert!(
                    centres.iter().any(|&c| dist(q, c) <= r),
                    "index {i} pixel {j}"
                );
            }
        }
    }

    #[test]
    fn ids_lengths_and_dots_are_valid() {
        for t in [lite(16), lite(32)] {
            let n = t.size();
            for i in 0..100 {
                let ex = t.example(Split::Test, i);
                assert_eq!(ex.ids.len(), n * n);
                assert_eq!(ex.ids.len(), t.max_len());
                assert!(ex.ids.iter().all(|&v| v < 256) && ex.label < 2);
                let s = t.scene(Split::Test, i);
                assert!(s.paths.len() >= 2);
                assert!(s.dots.iter().all(|&(p, e)| p < 2 && e < 2));
                assert!(s.paths.iter().all(|p| !p.is_empty() && p.len() % 2 == 0));
                for c in s.dot_centres().unwrap() {
                    let px = c.1 as usize * n + c.0 as usize;
                    let lit = ex.ids[px] > u32::from(t.params().path_gray);
                    assert!(lit, "dot centre not brighter than paths, index {i}");
                }
            }
        }
    }

    #[test]
    fn dot_distance_does_not_reveal_the_label() {
        let t = lite(32);
        let mean = |label: u32| {
            let sum: f64 = (0..300)
                .map(|i| {
                    let c = t
                        .scene_with_label(Split::Train, i, label)
                        .dot_centres()
                        .unwrap();
                    dist(c[0], c[1])
                })
                .sum();
            sum / 300.0
        };
        let (neg, pos) = (mean(0), mean(1));
        assert!(
            (neg - pos).abs() < 0.05 * pos,
            "mean dot distance {neg} vs {pos}"
        );
    }

    /// Cosine between the direction the second dot's path leaves in and the line to the
    /// first dot.
    fn aim(s: &Scene) -> f64 {
        let (path, end) = s.dots[1];
        let pts = &s.paths[path];
        let (q, next) = if end == 0 {
            (pts[0], pts[1])
        } else {
            (pts[pts.len() - 1], pts[pts.len() - 2])
        };
        let c = s.dot_centres().unwrap()[0];
        (angle(q, next) - angle(q, c)).cos()
    }

    #[test]
    fn second_dot_path_does_not_aim_differently() {
        let t = lite(32);
        let mean = |label: u32| {
            let sum: f64 = (0..400)
                .map(|i| aim(&t.scene_with_label(Split::Test, i, label)))
                .sum();
            sum / 400.0
        };
        let (neg, pos) = (mean(0), mean(1));
        assert!((neg - pos).abs() < 0.1, "mean aim {neg} vs {pos}");
    }

    #[test]
    fn target_paths_have_equal_length() {
        for size in [16, 32] {
            let t = lite(size);
            for i in 0..50 {
                let s = t.scene(Split::Train, i);
                assert_eq!(s.paths[0].len(), s.paths[1].len());
            }
        }
    }

    #[test]
    fn paths_keep_their_clearance() {
        let t = lite(32);
        let p = t.params();
        for i in 0..50 {
            let s = t.scene(Split::Train, i);
            let dashes: Vec<(usize, Pt, Pt)> = s
                .paths
                .iter()
                .enumerate()
                .flat_map(|(id, pts)| pts.chunks_exact(2).map(move |d| (id, d[0], d[1])))
                .collect();
            for (x, &(pa, a, b)) in dashes.iter().enumerate() {
                for &(pb, c, d) in &dashes[x + 1..] {
                    if pa != pb {
                        assert!(segment_segment(a, b, c, d) >= p.clearance - 1e-9);
                    }
                }
            }
        }
    }

    #[test]
    fn deterministic_and_splits_differ() {
        let t = lite(16);
        let u = lite(16);
        for i in 0..20 {
            assert_eq!(t.example(Split::Train, i), u.example(Split::Train, i));
            let tr = t.example(Split::Train, i).ids;
            assert_ne!(tr, t.example(Split::Val, i).ids);
            assert_ne!(tr, t.example(Split::Test, i).ids);
        }
    }

    #[test]
    fn every_size_generates() {
        for size in SIZES {
            let t = lite(size);
            for i in 0..5 {
                let ex = t.example(Split::Train, i);
                assert_eq!(ex.ids.len(), size * size);
                // Two targets, plus distractors where the size has them.
                let want = if t.params().distractors == 0 { 2 } else { 3 };
                assert!(t.scene(Split::Train, i).paths.len() >= want, "size {size}");
            }
        }
        assert!(Pathfinder::new(Setting::Lite, 0, 20).is_err());
        assert!(Pathfinder::for_task("pathy", Setting::Lite, 0).is_err());
        let x = Pathfinder::for_task("pathx", Setting::Full, 0).unwrap();
        assert_eq!(
            (x.name(), x.max_len(), x.len(Split::Train)),
            ("pathx", 16384, 160_000)
        );
        let x = Pathfinder::for_task("pathx", Setting::Lite, 0).unwrap();
        assert_eq!((x.name(), x.size()), ("pathx", 32));
        assert!(x.source().contains("feasible"));
    }

    #[test]
    fn tsv_has_header_and_rows() {
        let t = lite(16);
        let mut buf = Vec::new();
        t.write_tsv(Split::Train, 3, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Target\tPixels");
        assert_eq!(lines.len(), 4);
        let (label, pixels) = lines[1].split_once('\t').unwrap();
        assert_eq!(label, t.example(Split::Train, 0).label.to_string());
        assert_eq!(pixels.split(' ').count(), 256);
    }

    #[test]
    fn grid_png_decodes() {
        let t = lite(32);
        let images: Vec<(Vec<u8>, u32)> = (0..6)
            .map(|i| {
                let s = t.scene(Split::Train, i);
                (render(&s), s.label)
            })
            .collect();
        let path = std::env::temp_dir().join(format!("pathfinder-grid-{}.png", std::process::id()));
        write_grid_png(&path, &images, 32, 4).unwrap();
        let decoder = png::Decoder::new(File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let tile = 32 * 4 + 2 * FRAME;
        assert_eq!(info.width as usize, 4 * (tile + GAP) + GAP);
        assert_eq!(info.height as usize, 2 * (tile + GAP) + GAP);
        assert_eq!(info.color_type, png::ColorType::Rgb);
        std::fs::remove_file(&path).unwrap();
        assert!(write_grid_png(&path, &[], 32, 4).is_err());
        assert!(write_grid_png(&path, &[(vec![0; 5], 0)], 32, 4).is_err());
    }
}

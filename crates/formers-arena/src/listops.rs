//! ListOps (Nangia & Bowman 2018, "ListOps: A Diagnostic Dataset for Latent Tree Learning")
//! in the form used by Long Range Arena (Tay et al., ICLR 2021).
//!
//! Re-implements LRA's generator (`lra_benchmarks/data/listops.py`) and its input pipeline
//! (`lra_benchmarks/listops/input_pipeline.py`):
//!
//! * operators `[MAX`, `[MIN`, `[MED` (median), `[SM` (sum mod 10), closed by `]`; values 0–9;
//! * a node at depth `d < max_depth` (the root has depth 1) is an operator with probability
//!   `VALUE_P = 0.25`, else a uniform value; nodes at `max_depth` are values; an operator gets
//!   `randint(2, max_args)` (inclusive) arguments and a uniform operator;
//! * LRA's length counts operators, `]` and values (not parentheses) and keeps a tree only if
//!   `min_length < length < max_length` (strict), by rejection;
//! * the `Source` column wraps every (function, argument) pair in parentheses, e.g.
//!   `[MAX 2 9 ]` is written `( ( ( [MAX 2 ) 9 ) ] )`; the input pipeline strips `(`/`)` and
//!   renames `]` to `X`, then splits on whitespace, so the model sees only operators, `]` and
//!   digits (15 tokens; here ids 1–15, 0 is padding);
//! * the median is `int(np.median(args))`: the mean of the two middle values, truncated, for an
//!   even count (`[MED 1 2 3 4 ]` = 2).
//!
//! Settings: `Full` is LRA's (lengths 501–1999, depth ≤ 10, ≤ 10 arguments, 96,000 / 2,000 /
//! 2,000, max_len 2,000). `Lite` has lengths 65–255 (64 < length < 256), 5,000 / 500 / 1,000,
//! max_len 256, LRA's ≤ 10 arguments, and **depth ≤ 5** instead of LRA's 10
//! ([`LITE_MAX_DEPTH`]): with depth ≤ 10 the lite model (2 layers of width 64) stayed at
//! 32–33% test accuracy after 400–1,200 steps at any learning rate, with first-token pooling,
//! 4 layers or width 128, which leaves no room between variants; at depth ≤ 5 vanilla
//! reaches about 40% in 500 steps (majority class 18.7%). Lite ListOps accuracies are
//! therefore not comparable with LRA's (36.4% for its Transformer at full length). Generated examples are a pure function of (seed, split, index), and
//! the splits are disjoint by construction (`task::draw_in_split`: a hash of the tokens
//! decides which split an expression may belong to), as LRA's de-duplication through a
//! Python `set` makes them; training on generated ListOps draws fresh expressions every step.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use formers::rng::Rng;

use crate::task::{draw_in_split, ArenaTask, Example, Setting, Split};

/// The lite suite's maximum tree depth (LRA's is 10): see the module doc.
pub const LITE_MAX_DEPTH: usize = 5;

/// Token strings by id; id 0 is padding and never produced.
pub const VOCAB: [&str; 16] = [
    "<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "[MAX", "[MIN", "[MED", "[SM", "]",
];

const DIGIT_0: u8 = 1;
const END: u8 = 15;
/// LRA's probability that a node above the maximum depth is an operator.
const VALUE_P: f64 = 0.25;
/// Rejection-sampling attempts before the (never expected) constructive fallback.
const MAX_ATTEMPTS: usize = 100_000;

/// A ListOps operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Max,
    Min,
    Med,
    SumMod,
}

impl Op {
    /// All operators (LRA draws them uniformly).
    pub const ALL: [Op; 4] = [Op::Max, Op::Min, Op::Med, Op::SumMod];

    /// The token id of the operator.
    pub fn id(self) -> u8 {
        match self {
            Op::Max => 11,
            Op::Min => 12,
            Op::Med => 13,
            Op::SumMod => 14,
        }
    }

    /// The operator of a token id, if it is one.
    pub fn from_id(id: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.id() == id)
    }

    /// The opening token, e.g. `[MAX`.
    pub fn symbol(self) -> &'static str {
        VOCAB[self.id() as usize]
    }

    /// The value of the operator on `args` (non-empty), as LRA's `to_value` computes it.
    pub fn apply(self, args: &[u32]) -> u32 {
        match self {
            Op::Max => args.iter().copied().max().unwrap_or(0),
            Op::Min => args.iter().copied().min().unwrap_or(0),
            Op::Med => median_truncated(args),
            Op::SumMod => (args.iter().map(|&v| v as u64).sum::<u64>() % 10) as u32,
        }
    }
}

/// `int(np.median(args))`: middle value, or the truncated mean of the two middle values.
fn median_truncated(args: &[u32]) -> u32 {
    if args.is_empty() {
        return 0;
    }
    let mut sorted = args.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

/// Generation and size parameters of one setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Accepted lengths are strictly greater than this (LRA's `min_length`).
    pub min_length: usize,
    /// Accepted lengths are strictly less than this (LRA's `max_length`).
    pub max_length: usize,
    /// Maximum tree depth, counting the root as 1 and values as a level (LRA's `max_depth`).
    pub max_depth: usize,
    /// Maximum number of arguments per operator (LRA's `max_args`).
    pub max_args: usize,
    /// Examples in train, val and test.
    pub sizes: [usize; 3],
    /// The model's input length.
    pub model_max_len: usize,
}

impl Config {
    /// The parameters of `setting`.
    pub fn of(setting: Setting) -> Config {
        match setting {
            Setting::Full => Config {
                min_length: 500,
                max_length: 2000,
                max_depth: 10,
                max_args: 10,
                sizes: [96_000, 2_000, 2_000],
                model_max_len: 2000,
            },
            Setting::Lite => Config {
                min_length: 64,
                max_length: 256,
                max_depth: LITE_MAX_DEPTH,
                max_args: 10,
                sizes: [5_000, 500, 1_000],
                model_max_len: 256,
            },
        }
    }

    fn size(&self, split: Split) -> usize {
        self.sizes[split_slot(split)]
    }
}

fn split_slot(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

/// One loaded row: token ids (1–15, untruncated) and its label.
#[derive(Debug, Clone)]
struct Row {
    tokens: Box<[u8]>,
    label: u8,
}

#[derive(Debug)]
enum Origin {
    Generated { seed: u64 },
    Files { dir: PathBuf, rows: [Vec<Row>; 3] },
}

/// The ListOps task, generated lazily or read from LRA's released TSV files.
#[derive(Debug)]
pub struct ListOps {
    config: Config,
    origin: Origin,
}

impl ListOps {
    /// A generated ListOps of `setting`; examples are produced on demand in `example()`.
    pub fn new(setting: Setting, seed: u64) -> ListOps {
        ListOps {
            config: Config::of(setting),
            origin: Origin::Generated { seed },
        }
    }

    /// Reads LRA's released `basic_train.tsv`, `basic_val.tsv` and `basic_test.tsv`
    /// (`lra_release/listops-1000/`) from `dir`, keeping at most the setting's split sizes.
    /// Inputs longer than the setting's `max_len` are truncated, as LRA's pipeline does.
    pub fn from_tsv_dir(dir: &Path, setting: Setting) -> Result<ListOps, String> {
        let config = Config::of(setting);
        let mut rows: [Vec<Row>; 3] = Default::default();
        for split in Split::ALL {
            let path = dir.join(format!("basic_{}.tsv", split.name()));
            rows[split_slot(split)] = read_tsv(&path, config.size(split))?;
        }
        Ok(ListOps {
            config,
            origin: Origin::Files {
                dir: dir.to_path_buf(),
                rows,
            },
        })
    }

    /// The generation and size parameters in use.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Token ids (untruncated) and label of example `index` of `split`; generated examples
    /// exist for every index, file examples only below `len(split)`.
    fn tokens_and_label(&self, split: Split, index: usize) -> (Vec<u8>, u32) {
        match &self.origin {
            Origin::Generated { seed } => {
                let ex = draw_in_split(*seed, split, index, |rng| {
                    let tokens = sample_tokens(rng, &self.config);
                    let label = eval_ids(&tokens).expect("generated expressions are well formed");
                    Example::new(tokens.iter().map(|&t| u32::from(t)).collect(), label)
                });
                (ex.ids.iter().map(|&t| t as u8).collect(), ex.label)
            }
            Origin::Files { rows, .. } => {
                let row = &rows[split_slot(split)][index];
                (row.tokens.to_vec(), row.label as u32)
            }
        }
    }
}

impl ArenaTask for ListOps {
    fn name(&self) -> &'static str {
        "listops"
    }

    fn source(&self) -> String {
        match &self.origin {
            Origin::Generated { seed } => {
                format!("generated (LRA ListOps generator), seed {seed}")
            }
            Origin::Files { dir, .. } => format!("LRA files in {}", dir.display()),
        }
    }

    fn n_classes(&self) -> usize {
        10
    }

    fn vocab_size(&self) -> usize {
        VOCAB.len()
    }

    fn max_len(&self) -> usize {
        self.config.model_max_len
    }

    fn generated(&self) -> bool {
        matches!(self.origin, Origin::Generated { .. })
    }

    fn len(&self, split: Split) -> usize {
        match &self.origin {
            Origin::Generated { .. } => self.config.size(split),
            Origin::Files { rows, .. } => rows[split_slot(split)].len(),
        }
    }

    fn example(&self, split: Split, index: usize) -> Example {
        let (tokens, label) = self.tokens_and_label(split, index);
        let ids = tokens
            .iter()
            .take(self.config.model_max_len)
            .map(|&t| t as u32)
            .collect();
        Example::new(ids, label)
    }

    /// LRA's layout: header `Source\tTarget`, then `( ( ( [MAX 2 ) 9 ) ] )\t9` per row
    /// (LRA's Python `csv.writer` ends lines with `\r\n`; this writes `\n`, and the reader
    /// accepts both).
    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "Source\tTarget")?;
        for index in 0..n.min(self.len(split)) {
            let (tokens, label) = self.tokens_and_label(split, index);
            writeln!(out, "{}\t{}", lra_source(&tokens), label)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Generation

/// Rejection-samples one expression (token ids) whose length is within the config's bounds.
fn sample_tokens(rng: &mut Rng, config: &Config) -> Vec<u8> {
    let mut tokens = Vec::with_capacity(config.max_length);
    for _ in 0..MAX_ATTEMPTS {
        tokens.clear();
        if grow(rng, 1, config, &mut tokens) && tokens.len() > config.min_length {
            return tokens;
        }
    }
    fallback_tokens(rng, config)
}

/// Appends a random tree at `depth` to `out` following LRA's `generate_tree`; returns false
/// as soon as the expression reaches `max_length` (it would be rejected anyway), which
/// bounds the work per attempt. Recursion depth is bounded by `max_depth`.
fn grow(rng: &mut Rng, depth: usize, config: &Config, out: &mut Vec<u8>) -> bool {
    let is_operator = depth < config.max_depth && rng.uniform() <= VALUE_P;
    if !is_operator {
        out.push(DIGIT_0 + rng.below(10) as u8);
        return out.len() < config.max_length;
    }
    let n_args = 2 + rng.below(config.max_args - 1);
    let op = Op::ALL[rng.below(Op::ALL.len())];
    out.push(op.id());
    for _ in 0..n_args {
        if !grow(rng, depth + 1, config, out) {
            return false;
        }
    }
    out.push(END);
    out.len() < config.max_length
}

/// A complete tree (every operator with the same fan-out) whose length lies within bounds:
/// used only if rejection sampling ever failed `MAX_ATTEMPTS` times in a row.
fn fallback_tokens(rng: &mut Rng, config: &Config) -> Vec<u8> {
    let mut shape = (1, 2);
    'search: for levels in 1..config.max_depth {
        for fan_out in 2..=config.max_args {
            let length = complete_length(levels, fan_out);
            if length > config.min_length && length < config.max_length {
                shape = (levels, fan_out);
                break 'search;
            }
        }
    }
    let mut tokens = Vec::new();
    push_complete(rng, shape.0, shape.1, &mut tokens);
    tokens
}

/// Length of a complete tree with `levels` operator levels and `fan_out` arguments each.
fn complete_length(levels: usize, fan_out: usize) -> usize {
    (0..levels).fold(1, |below, _| 2 + fan_out * below)
}

fn push_complete(rng: &mut Rng, levels: usize, fan_out: usize, out: &mut Vec<u8>) {
    if levels == 0 {
        out.push(DIGIT_0 + rng.below(10) as u8);
        return;
    }
    out.push(Op::ALL[rng.below(Op::ALL.len())].id());
    for _ in 0..fan_out {
        push_complete(rng, levels - 1, fan_out, out);
    }
    out.push(END);
}

// ---------------------------------------------------------------------------------------
// Parsing, evaluation and rendering

/// Maps a Source string (with or without LRA's parentheses) to token ids 1–15; `]` may also
/// be written `X` (LRA's pipeline renames it). Parentheses must balance.
pub fn encode(source: &str) -> Result<Vec<u32>, String> {
    Ok(lex(source)?.into_iter().map(|t| t as u32).collect())
}

fn lex(source: &str) -> Result<Vec<u8>, String> {
    let mut tokens = Vec::new();
    let mut open_parens: usize = 0;
    for (position, word) in source.split_whitespace().enumerate() {
        match word {
            "(" => open_parens += 1,
            ")" => {
                open_parens = open_parens
                    .checked_sub(1)
                    .ok_or_else(|| format!("unmatched ')' at token {}", position + 1))?;
            }
            "X" => tokens.push(END),
            _ => match VOCAB[1..].iter().position(|&v| v == word) {
                Some(i) => tokens.push(i as u8 + 1),
                None => return Err(format!("unknown token '{word}' at token {}", position + 1)),
            },
        }
    }
    if open_parens != 0 {
        return Err(format!("{open_parens} unclosed '('"));
    }
    Ok(tokens)
}

/// Evaluates a ListOps Source string (as LRA writes it, or without parentheses) independently
/// of the generator: the value 0–9 of the expression, or why it is malformed.
pub fn evaluate(source: &str) -> Result<u32, String> {
    eval_ids(&lex(source)?)
}

/// Stack evaluator over token ids (no recursion, so any nesting depth is safe).
fn eval_ids(tokens: &[u8]) -> Result<u32, String> {
    let mut frames: Vec<(Op, Vec<u32>)> = Vec::new();
    let mut result: Option<u32> = None;
    for (position, &token) in tokens.iter().enumerate() {
        let value = if let Some(op) = Op::from_id(token) {
            if result.is_some() {
                return Err(format!(
                    "token {} follows a complete expression",
                    position + 1
                ));
            }
            frames.push((op, Vec::new()));
            continue;
        } else if token == END {
            let (op, args) = frames
                .pop()
                .ok_or_else(|| format!("unmatched ']' at token {}", position + 1))?;
            if args.is_empty() {
                return Err(format!("{} without arguments", op.symbol()));
            }
            op.apply(&args)
        } else if (DIGIT_0..DIGIT_0 + 10).contains(&token) {
            (token - DIGIT_0) as u32
        } else {
            return Err(format!("bad token id {token}"));
        };
        match frames.last_mut() {
            Some((_, args)) => args.push(value),
            None if result.is_none() => result = Some(value),
            None => {
                return Err(format!(
                    "token {} follows a complete expression",
                    position + 1
                ));
            }
        }
    }
    if let Some((op, _)) = frames.last() {
        return Err(format!("{} is never closed", op.symbol()));
    }
    result.ok_or_else(|| "empty expression".to_string())
}

/// Shape statistics of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExprStats {
    /// Length as LRA counts it: operators, `]` and values (no parentheses).
    pub tokens: usize,
    /// Tree depth as LRA counts it: a lone value has depth 1, `[MAX 1 2 ]` depth 2.
    pub depth: usize,
    /// Largest number of arguments of any operator.
    pub max_args: usize,
    /// How often each operator occurs, in the order of `Op::ALL`.
    pub op_counts: [usize; 4],
}

/// Shape statistics of a well-formed Source string.
pub fn stats(source: &str) -> Result<ExprStats, String> {
    let tokens = lex(source)?;
    eval_ids(&tokens)?;
    let mut stats = ExprStats {
        tokens: tokens.len(),
        ..ExprStats::default()
    };
    let mut open_args: Vec<usize> = Vec::new();
    for &token in &tokens {
        if let Some(op) = Op::from_id(token) {
            stats.op_counts[Op::ALL.iter().position(|&o| o == op).unwrap_or(0)] += 1;
            if let Some(n) = open_args.last_mut() {
                *n += 1;
            }
            open_args.push(0);
            stats.depth = stats.depth.max(open_args.len());
        } else if token == END {
            let n = open_args.pop().unwrap_or(0);
            stats.max_args = stats.max_args.max(n);
        } else if let Some(n) = open_args.last_mut() {
            *n += 1;
        }
    }
    stats.depth += 1; // the level of the leaves
    Ok(stats)
}

/// Tree depth as LRA counts it (values are a level: `[MAX 1 2 ]` has depth 2); for a
/// malformed string, the deepest operator nesting seen plus one.
pub fn depth(source: &str) -> usize {
    let (mut open, mut deepest) = (0usize, 0usize);
    for word in source.split_whitespace() {
        if word.starts_with('[') {
            open += 1;
            deepest = deepest.max(open);
        } else if word == "]" || word == "X" {
            open = open.saturating_sub(1);
        }
    }
    deepest + 1
}

/// Renders well-formed token ids exactly as LRA's `to_string` does: each operator with `n`
/// arguments opens `n + 1` parentheses, each argument closes one, `]` closes the last.
fn lra_source(tokens: &[u8]) -> String {
    let n_args = argument_counts(tokens);
    let mut out = String::with_capacity(tokens.len() * 5);
    let mut open_ops = 0usize;
    for (i, &token) in tokens.iter().enumerate() {
        if let Some(op) = Op::from_id(token) {
            if open_ops > 0 {
                out.push(' ');
            }
            for _ in 0..=n_args[i] {
                out.push_str("( ");
            }
            out.push_str(op.symbol());
            open_ops += 1;
        } else if token == END {
            out.push_str(" ] )");
            open_ops = open_ops.saturating_sub(1);
            if open_ops > 0 {
                out.push_str(" )");
            }
        } else {
            if open_ops > 0 {
                out.push(' ');
            }
            out.push_str(VOCAB[token as usize]);
            if open_ops > 0 {
                out.push_str(" )");
            }
        }
    }
    out
}

/// For each operator position, its number of arguments (0 elsewhere).
fn argument_counts(tokens: &[u8]) -> Vec<usize> {
    let mut counts = vec![0; tokens.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, &token) in tokens.iter().enumerate() {
        let is_op = Op::from_id(token).is_some();
        if !is_op && token != END {
            if let Some(&at) = open.last() {
                counts[at] += 1;
            }
        }
        if is_op {
            if let Some(&at) = open.last() {
                counts[at] += 1;
            }
            open.push(i);
        } else if token == END {
            open.pop();
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------
// Files

/// Reads at most `limit` rows of an LRA ListOps TSV file.
fn read_tsv(path: &Path, limit: usize) -> Result<Vec<Row>, String> {
    let file = File::open(path).map_err(|e| {
        format!(
            "cannot open {}: {e} (expected LRA's basic_train.tsv, basic_val.tsv and \
             basic_test.tsv from lra_release/listops-1000/)",
            path.display()
        )
    })?;
    let mut lines = BufReader::new(file).lines();
    let header = read_line(lines.next(), path, 1)?.unwrap_or_default();
    if header.trim_end_matches('\r') != "Source\tTarget" {
        return Err(format!(
            "{} line 1: expected header 'Source<TAB>Target', found '{}'",
            path.display(),
            header.trim_end()
        ));
    }
    let mut rows = Vec::new();
    let mut line_no = 1;
    while rows.len() < limit {
        line_no += 1;
        let Some(line) = read_line(lines.next(), path, line_no)? else {
            break;
        };
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row(line).map_err(|e| format!("{} line {line_no}: {e}", path.display()))?;
        rows.push(row);
    }
    Ok(rows)
}

fn read_line(
    next: Option<io::Result<String>>,
    path: &Path,
    line_no: usize,
) -> Result<Option<String>, String> {
    next.transpose()
        .map_err(|e| format!("{} line {line_no}: {e}", path.display()))
}

fn parse_row(line: &str) -> Result<Row, String> {
    let (source, target) = line
        .split_once('\t')
        .ok_or_else(|| "expected 'Source<TAB>Target'".to_string())?;
    let label: u8 = target
        .trim()
        .parse()
        .ok()
        .filter(|&l: &u8| l < 10)
        .ok_or_else(|| format!("bad Target '{target}' (want 0-9)"))?;
    let tokens = lex(source)?;
    eval_ids(&tokens)?;
    Ok(Row {
        tokens: tokens.into_boxed_slice(),
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LRA's tuple tree, to check the renderer against a literal port of `to_string`.
    enum Pair {
        Leaf(String),
        Node(Box<Pair>, Box<Pair>),
    }

    fn pair_tree(tokens: &[u8], pos: &mut usize) -> Pair {
        let token = tokens[*pos];
        *pos += 1;
        let Some(op) = Op::from_id(token) else {
            return Pair::Leaf(VOCAB[token as usize].to_string());
        };
        let mut t = Pair::Leaf(op.symbol().to_string());
        while tokens[*pos] != END {
            t = Pair::Node(Box::new(t), Box::new(pair_tree(tokens, pos)));
        }
        *pos += 1;
        Pair::Node(Box::new(t), Box::new(Pair::Leaf("]".into())))
    }

    fn pair_string(t: &Pair) -> String {
        match t {
            Pair::Leaf(s) => s.clone(),
            Pair::Node(l, r) => format!("( {} {} )", pair_string(l), pair_string(r)),
        }
    }

    fn sample_source(task: &ListOps, split: Split, index: usize) -> (String, u32) {
        let (tokens, label) = task.tokens_and_label(split, index);
        (lra_source(&tokens), label)
    }

    fn check_samples(setting: Setting, n: usize) {
        let task = ListOps::new(setting, 0);
        let config = task.config();
        let mut labels = [0usize; 10];
        let mut ops = [0usize; 4];
        let mut deepest = 0;
        for index in 0..n {
            let (source, label) = sample_source(&task, Split::Train, index);
            assert_eq!(evaluate(&source), Ok(label), "{source}");
            let s = stats(&source).unwrap();
            assert!(
                s.tokens > config.min_length && s.tokens < config.max_length,
                "length {}",
                s.tokens
            );
            assert!(s.tokens <= task.max_len());
            assert!(
                s.depth <= config.max_depth && depth(&source) == s.depth,
                "depth {}",
                s.depth
            );
            assert!((2..=10).contains(&s.max_args), "args {}", s.max_args);
            deepest = deepest.max(s.depth);
            labels[label as usize] += 1;
            for (total, count) in ops.iter_mut().zip(s.op_counts) {
                *total += count;
            }
        }
        assert!(labels.iter().all(|&c| c > 0), "labels {labels:?}");
        assert!(ops.iter().all(|&c| c > 0), "ops {ops:?}");
        if setting == Setting::Lite {
            // The lite bound is reached, so it is the one that applies.
            assert_eq!(deepest, LITE_MAX_DEPTH);
        }
    }

    #[test]
    fn lite_samples_are_valid() {
        check_samples(Setting::Lite, 10_000);
    }

    #[test]
    fn full_samples_are_valid() {
        check_samples(Setting::Full, 300);
    }

    #[test]
    fn evaluator_on_hand_written_expressions() {
        assert_eq!(evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]"), Ok(9));
        assert_eq!(evaluate("[SM 8 7 ]"), Ok(5));
        assert_eq!(evaluate("[MED 1 2 3 4 ]"), Ok(2)); // int(np.median) = int(2.5)
        assert_eq!(evaluate("[MED 3 9 ]"), Ok(6));
        assert_eq!(evaluate("[MED 9 1 5 ]"), Ok(5));
        assert_eq!(evaluate("[MIN 3 [MAX 1 0 ] 2 ]"), Ok(1));
        assert_eq!(evaluate("( ( ( [MAX 2 ) 9 ) ] )"), Ok(9));
        assert_eq!(evaluate("[SM 5 5 X"), Ok(0));
        assert_eq!(evaluate("7"), Ok(7));
        for bad in [
            "",
            "[MAX 1 2",
            "[MAX ]",
            "1 2",
            "[FOO 1 ]",
            "]",
            "( [MAX 1 ]",
            "[SM 1 ] 2",
        ] {
            assert!(evaluate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rendering_matches_lra_to_string() {
        let tokens = lex("[MAX 2 [MIN 4 7 ] 0 ]").unwrap();
        assert_eq!(
            lra_source(&tokens),
            "( ( ( ( [MAX 2 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
        );
        let task = ListOps::new(Setting::Lite, 3);
        for index in 0..200 {
            let (tokens, _) = task.tokens_and_label(Split::Val, index);
            let expected = pair_string(&pair_tree(&tokens, &mut 0));
            assert_eq!(lra_source(&tokens), expected);
            assert_eq!(lex(&expected).unwrap(), tokens);
        }
    }

    #[test]
    fn examples_are_deterministic_and_splits_differ() {
        let a = ListOps::new(Setting::Lite, 11);
        let b = ListOps::new(Setting::Lite, 11);
        let c = ListOps::new(Setting::Lite, 12);
        for index in 0..50 {
            let e = a.example(Split::Train, index);
            assert_eq!(e, b.example(Split::Train, index));
            assert_ne!(e, a.example(Split::Test, index));
            assert_ne!(e, a.example(Split::Val, index));
            assert_ne!(e, c.example(Split::Train, index));
            assert!(e
                .ids
                .iter()
                .all(|&id| id > 0 && (id as usize) < a.vocab_size()));
            assert!(e.label < 10);
        }
        assert_eq!(a.len(Split::Train), 5_000);
        assert_eq!(a.len(Split::Val), 500);
        assert_eq!(a.len(Split::Test), 1_000);
        let full = ListOps::new(Setting::Full, 0);
        assert_eq!(full.len(Split::Train), 96_000);
        assert_eq!(full.max_len(), 2000);
        assert_eq!(a.vocab_size(), 16);
        assert_eq!(a.n_classes(), 10);
        assert_eq!(a.name(), "listops");
        assert_eq!(a.source(), "generated (LRA ListOps generator), seed 11");
    }

    #[test]
    fn fallback_fits_both_settings() {
        for setting in [Setting::Lite, Setting::Full] {
            let config = Config::of(setting);
            let tokens = fallback_tokens(&mut Rng::new(5), &config);
            assert!(tokens.len() > config.min_length && tokens.len() < config.max_length);
            let s = stats(&lra_source(&tokens)).unwrap();
            assert!(s.depth <= config.max_depth && s.max_args <= config.max_args);
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("listops-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tsv_round_trip() {
        let dir = temp_dir("roundtrip");
        let task = ListOps::new(Setting::Lite, 4);
        let counts = [30, 7, 9];
        for split in Split::ALL {
            let path = dir.join(format!("basic_{}.tsv", split.name()));
            let mut file = File::create(&path).unwrap();
            task.write_tsv(split, counts[split_slot(split)], &mut file)
                .unwrap();
        }
        let loaded = ListOps::from_tsv_dir(&dir, Setting::Lite).unwrap();
        assert_eq!(loaded.source(), format!("LRA files in {}", dir.display()));
        for split in Split::ALL {
            assert_eq!(loaded.len(split), counts[split_slot(split)]);
            for index in 0..loaded.len(split) {
                assert_eq!(loaded.example(split, index), task.example(split, index));
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            task.write_tsv(split, 5, &mut a).unwrap();
            loaded.write_tsv(split, 5, &mut b).unwrap();
            assert_eq!(a, b);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tsv_errors_name_file_and_line() {
        let dir = temp_dir("errors");
        let missing = ListOps::from_tsv_dir(&dir, Setting::Lite).unwrap_err();
        assert!(missing.contains("basic_train.tsv"), "{missing}");
        let good = "Source\tTarget\r\n( ( [SM 1 ) 2 ] )\t3\r\n";
        std::fs::write(dir.join("basic_train.tsv"), good).unwrap();
        std::fs::write(dir.join("basic_val.tsv"), good).unwrap();
        let cases = [
            ("Src\tTarget\n", "line 1"),
            ("Source\tTarget\n[SM 1 2 ]\t3\n[SM 1 2\t3\n", "line 3"),
            ("Source\tTarget\n[SM 1 2 ]\t12\n", "line 2"),
            ("Source\tTarget\n[SM 1 2 ]\n", "line 2"),
            ("Source\tTarget\n[FOO 1 ]\t1\n", "'[FOO'"),
        ];
        for (text, expected) in cases {
            std::fs::write(dir.join("basic_test.tsv"), text).unwrap();
            let err = ListOps::from_tsv_dir(&dir, Setting::Lite).unwrap_err();
            assert!(err.contains("basic_test.tsv"), "{err}");
            assert!(err.contains(expected), "{err}");
        }
        std::fs::write(dir.join("basic_test.tsv"), good).unwrap();
        let ok = ListOps::from_tsv_dir(&dir, Setting::Lite).unwrap();
        assert_eq!(ok.example(Split::Test, 0).label, 3);
        assert_eq!(ok.example(Split::Test, 0).ids, vec![14, 2, 3, 15]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! A bag-of-ids logistic regression: the floor an arena model should beat, and a check that a
//! task's labels carry signal a simple model can find (and that the task is not solved by
//! counting alone). Multinomial logistic regression (Cox 1958) on standardised features,
//! trained by full-batch gradient descent; deterministic.

use crate::task::{ArenaTask, Example, Split};

/// What the regression sees of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Features {
    /// The frequency of each id among the input's ids.
    Bag,
    /// For an input that is two documents (retrieval, [`Example::second`]): the
    /// product and the absolute difference of the two documents' id frequencies, which can
    /// tell whether they are alike but not which documents they are.
    PairOfHalves,
}

impl Features {
    /// The features a task's baseline uses: pairs for retrieval, bags otherwise.
    pub fn for_task(task: &dyn ArenaTask) -> Features {
        if task.name() == "retrieval" {
            Features::PairOfHalves
        } else {
            Features::Bag
        }
    }

    fn of(self, ex: &Example, vocab: usize, max_len: usize) -> Vec<f32> {
        match self {
            Features::Bag => frequencies(&ex.ids, vocab),
            Features::PairOfHalves => {
                let half = ex.second.unwrap_or(max_len / 2).min(ex.ids.len());
                let a = frequencies(&ex.ids[..half], vocab);
                let b = frequencies(&ex.ids[half..], vocab);
                let product = a.iter().zip(&b).map(|(x, y)| x * y * vocab as f32);
                let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs());
                product.chain(diff).collect()
            }
        }
    }
}

/// Frequency of each id `0..vocab` among `ids` (ids at or past `vocab` are not counted).
fn frequencies(ids: &[u32], vocab: usize) -> Vec<f32> {
    let mut f = vec![0f32; vocab];
    for &id in ids {
        if let Some(x) = f.get_mut(id as usize) {
            *x += 1.0;
        }
    }
    let n = ids.len().max(1) as f32;
    f.iter_mut().for_each(|x| *x /= n);
    f
}

/// Test accuracy of the regression trained on the first `train` training examples of
/// `task` (all of them if fewer) for `iterations` full-batch steps.
pub fn accuracy(task: &dyn ArenaTask, features: Features, train: usize, iterations: usize) -> f64 {
    let (vocab, max_len, classes) = (task.vocab_size(), task.max_len(), task.n_classes());
    let rows = |split: Split, n: usize| -> (Vec<Vec<f32>>, Vec<usize>) {
        (0..n.min(task.len(split)))
            .map(|i| {
                let ex = task.example(split, i);
                (features.of(&ex, vocab, max_len), ex.label as usize)
            })
            .unzip()
    };
    let (mut x, y) = rows(Split::Train, train);
    let (mut xt, yt) = rows(Split::Test, usize::MAX);
    if x.is_empty() || xt.is_empty() {
        return f64::NAN;
    }
    standardise(&mut x, &mut xt);
    let w = fit(&x, &y, classes, iterations);
    let correct = xt
        .iter()
        .zip(&yt)
        .filter(|(row, &label)| argmax(&scores(&w, row, classes)) == label)
        .count();
    correct as f64 / xt.len() as f64
}

/// Scales every feature to mean 0 and deviation 1 on the training rows (constant features
/// become 0), and the test rows by the same.
fn standardise(train: &mut [Vec<f32>], test: &mut [Vec<f32>]) {
    let d = train[0].len();
    let n = train.len() as f32;
    for j in 0..d {
        let mean = train.iter().map(|r| r[j]).sum::<f32>() / n;
        let var = train.iter().map(|r| (r[j] - mean).powi(2)).sum::<f32>() / n;
        let scale = if var > 1e-12 { var.sqrt().recip() } else { 0.0 };
        for r in train.iter_mut().chain(test.iter_mut()) {
            r[j] = (r[j] - mean) * scale;
        }
    }
}

/// Weights `[classes][d + 1]` (the last column is the bias) after `iterations` steps of
/// gradient descent on the mean cross-entropy plus a small L2 penalty.
fn fit(x: &[Vec<f32>], y: &[usize], classes: usize, iterations: usize) -> Vec<Vec<f32>> {
    const LR: f32 = 0.5;
    const L2: f32 = 1e-3;
    let d = x[0].len();
    let mut w = vec![vec![0f32; d + 1]; classes];
    let n = x.len() as f32;
    for _ in 0..iterations {
        let mut grad = vec![vec![0f32; d + 1]; classes];
        for (row, &label) in x.iter().zip(y) {
            let p = softmax(&scores(&w, row, classes));
            for (c, g) in grad.iter_mut().enumerate() {
                let e = p[c] - if c == label { 1.0 } else { 0.0 };
                for (gj, xj) in g.iter_mut().zip(row) {
                    *gj += e * xj;
                }
                g[d] += e;
            }
        }
        for (wc, gc) in w.iter_mut().zip(&grad) {
            for (j, (wj, gj)) in wc.iter_mut().zip(gc).enumerate() {
                let decay = if j < d { L2 * *wj } else { 0.0 };
                *wj -= LR * (gj / n + decay);
            }
        }
    }
    w
}

fn scores(w: &[Vec<f32>], row: &[f32], classes: usize) -> Vec<f32> {
    (0..classes)
        .map(|c| {
            let wc = &w[c];
            row.iter().zip(wc).map(|(a, b)| a * b).sum::<f32>() + wc[row.len()]
        })
        .collect()
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

fn argmax(s: &[f32]) -> usize {
    s.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{open_task, DataDirs};
    use crate::task::Setting;

    fn baseline(name: &str, train: usize) -> f64 {
        let task = open_task(name, Setting::Lite, &DataDirs::default()).unwrap();
        accuracy(task.as_ref(), Features::for_task(task.as_ref()), train, 200)
    }

    #[test]
    fn the_regression_separates_classes_that_differ_in_their_ids() {
        // Two classes: inputs of mostly low ids or mostly high ids.
        let x: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let ids: Vec<u32> = (0..20)
                    .map(|k| ((i * 7 + k) % 4 + 4 * (i % 2)) as u32)
                    .collect();
                frequencies(&ids, 8)
            })
            .collect();
        let y: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let w = fit(&x, &y, 2, 100);
        for (row, &label) in x.iter().zip(&y) {
            assert_eq!(argmax(&scores(&w, row, 2)), label);
        }
    }

    /// The lite text task's labels carry signal a bag of bytes finds (3 classes: chance is
    /// 33%), without the bag solving it. Measured: 89.5% with 3,000 examples.
    #[test]
    fn lite_text_is_learnable_and_not_trivial() {
        let acc = baseline("text", 1500);
        assert!(acc > 0.6 && acc < 0.99, "bag-of-bytes text accuracy {acc}");
    }

    /// Lite ListOps (depth <= 5) is not solved by counting tokens: the bag stays near the
    /// majority class (18.7% of the test split), where the lite model reaches about 40%.
    /// Measured: 22.4% with 3,000 examples.
    #[test]
    fn lite_listops_is_not_solved_by_counting() {
        let acc = baseline("listops", 1000);
        assert!(acc < 0.3, "bag-of-ids listops accuracy {acc}");
    }

    /// Whether two neighbouring lite retrieval passages share text shows in how alike their
    /// byte frequencies are: well above chance (50%, 600 balanced test pairs: one standard
    /// error is 2 points) but not solved (measured: 88.2% with 1,500 pairs). A question
    /// whose overlaps are larger (at least 5/8 of a passage) was 99%: counting alone.
    #[test]
    fn lite_retrieval_has_signal_in_byte_frequencies() {
        let acc = baseline("retrieval", 1500);
        assert!(
            acc > 0.6 && acc < 0.95,
            "bag-of-bytes retrieval accuracy {acc}"
        );
    }
}

#[cfg(test)]
mod survey {
    use super::*;
    use crate::suite::{open_task, DataDirs};
    use crate::task::Setting;

    /// Prints every lite task's baseline (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn print_lite_baselines() {
        for name in ["listops", "text", "retrieval", "pathfinder"] {
            let task = open_task(name, Setting::Lite, &DataDirs::default()).unwrap();
            let f = Features::for_task(task.as_ref());
            let acc = accuracy(task.as_ref(), f, 3000, 300);
            println!("{name}: {f:?} baseline test accuracy {:.1}%", acc * 100.0);
        }
    }
}

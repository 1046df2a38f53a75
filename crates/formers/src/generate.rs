//! Autoregressive generation with the KV cache: greedy, temperature, top-k and top-p
//! (nucleus, Holtzman et al. 2020) sampling, seeded.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::model::{ids_tensor, Cache, Model};
use crate::rng::Rng;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sampling {
    /// Take the most likely token (ignores the other fields but `seed`).
    pub greedy: bool,
    /// Softmax temperature (> 0).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Rejects values that cannot sample, naming the field: a temperature that is not a
    /// positive finite number, `top_k` 0, `top_p` outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::config(
                "temperature",
                format!("must be a positive finite number, found {t}"),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::config("top_k", "must be at least 1, found 0"));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(Error::config(
                "top_p",
                format!("must be in (0, 1], found {p}"),
            ));
        }
        Ok(())
    }
}

/// Checks a generation request before any work: `sampling` valid, `prompt` not empty and
/// inside the vocabulary, prompt plus `max_new` within the model's `max_len` (with no
/// overflow, whatever `max_new` is).
pub fn check(model: &Model, prompt: &[u32], max_new: usize, sampling: &Sampling) -> Result<()> {
    check_prompt(model, prompt, sampling)?;
    let max_len = model.config().max_len;
    if prompt
        .len()
        .checked_add(max_new)
        .is_none_or(|n| n > max_len)
    {
        return Err(Error::Input(format!(
            "prompt of {} tokens plus {max_new} new ones exceeds the model's max_len {max_len}",
            prompt.len()
        )));
    }
    Ok(())
}

/// Checks what [`generate_sliding`] needs: `sampling` valid, `prompt` not empty, inside the
/// vocabulary and within the model's `max_len` (the new tokens are not bounded).
pub fn check_prompt(model: &Model, prompt: &[u32], sampling: &Sampling) -> Result<()> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    let vocab = model.config().input.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let max_len = model.config().max_len;
    if prompt.len() > max_len {
        return Err(Error::Input(format!(
            "prompt of {} tokens exceeds the model's max_len {max_len}",
            prompt.len()
        )));
    }
    Ok(())
}

/// Generates `max_new` tokens after `prompt`, calling `on_token` for each as it comes.
/// With `use_cache` false, every step recomputes the whole sequence (the reference).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    use_cache: bool,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    generate_until(model, prompt, max_new, sampling, use_cache, |t| {
        on_token(t);
        true
    })
}

/// [`generate`] that stops early, after the token for which `on_token` returns false (a
/// stop sequence, a client gone): the tokens up to and including that one.
pub fn generate_until(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    use_cache: bool,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    check(model, prompt, max_new, sampling)?;
    let window = model.config().max_len;
    decode(
        model, prompt, max_new, window, sampling, use_cache, on_token,
    )
}

/// [`generate_until`] past the model's positions: each token is predicted from the last
/// `window` tokens at most (capped at `max_len`; a model trained on shorter windows than
/// its `max_len` should be given its training length). While the sequence fits, this is
/// [`generate_until`]; once it is longer, the window slides, as nanoGPT's `generate` does,
/// and each token recomputes its window (the KV cache holds absolute positions).
pub fn generate_sliding(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    window: usize,
    sampling: &Sampling,
    use_cache: bool,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    check_prompt(model, prompt, sampling)?;
    let window = window.min(model.config().max_len).max(1);
    decode(
        model, prompt, max_new, window, sampling, use_cache, on_token,
    )
}

/// The decoding loop: cached while the whole sequence fits `window`, recomputed from the
/// last `window` tokens after (and at every step without the cache: the reference).
fn decode(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    window: usize,
    sampling: &Sampling,
    use_cache: bool,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let mut rng = Rng::new(sampling.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = use_cache.then(Cache::default);
    while tokens.len() - prompt.len() < max_new {
        let start = tokens.len().saturating_sub(window);
        if start > 0 {
            cache = None;
        }
        let last: Vec<f32> = match cache.as_mut() {
            Some(c) => {
                let fresh = &tokens[c.len()..];
                let logits = model.forward_cached_batch(&[fresh], &mut [c])?;
                logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?
            }
            None => {
                let logits = model.forward(&ids_tensor(&tokens[start..])?, None, None)?;
                let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.flatten_all()?;
                last.to_dtype(DType::F32)?.to_vec1()?
            }
        };
        finite_logits(&last, tokens.len() - prompt.len(), None)?;
        let next = sample(&last, sampling, &mut rng);
        tokens.push(next);
        if !on_token(next) {
            break;
        }
    }
    Ok(tokens.split_off(prompt.len()))
}

/// A sequence being generated with the KV cache: its tokens, its cache and its own seeded
/// sampler. Several advance together, a token each per [`step`]; they may join and leave
/// between steps (continuous batching, Orca: Yu et al. 2022).
#[derive(Debug, Clone)]
pub struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    sampling: Sampling,
    rng: Rng,
    cache: Cache,
}

impl Sequence {
    /// A sequence that will continue `prompt` by up to `max_new` tokens (checked as
    /// [`check`] does).
    pub fn new(model: &Model, prompt: &[u32], max_new: usize, sampling: &Sampling) -> Result<Self> {
        check(model, prompt, max_new, sampling)?;
        Ok(Sequence {
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            max_new,
            sampling: sampling.clone(),
            rng: Rng::new(sampling.seed),
            cache: Cache::default(),
        })
    }

    /// The prompt and the tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens the next step will feed: the prompt at first, then the newest token.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Whether all `max_new` tokens are generated.
    pub fn finished(&self) -> bool {
        self.generated().len() >= self.max_new
    }
}

/// Advances each of `seqs` by one token in one batched forward pass
/// ([`Model::forward_cached_batch`]: a newcomer's whole prompt, one token of the others)
/// and returns the new tokens in order. Each sequence samples with its own generator, so
/// its tokens do not depend on which others share its steps. A finished sequence is an
/// error; after any error the sequences of the step cannot continue.
pub fn step(model: &Model, seqs: &mut [&mut Sequence]) -> Result<Vec<u32>> {
    if let Some(i) = seqs.iter().position(|s| s.finished()) {
        return Err(Error::Input(format!(
            "sequence {i} of the step already has its {} tokens",
            seqs[i].max_new
        )));
    }
    let (fresh, mut caches): (Vec<&[u32]>, Vec<&mut Cache>) = seqs
        .iter_mut()
        .map(|s| {
            let Sequence { tokens, cache, .. } = &mut **s;
            (&tokens[cache.len()..], cache)
        })
        .unzip();
    let logits = model.forward_cached_batch(&fresh, &mut caches)?;
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    for (i, (s, row)) in seqs.iter().zip(&rows).enumerate() {
        finite_logits(row, s.generated().len(), Some(i))?;
    }
    Ok(seqs
        .iter_mut()
        .zip(rows)
        .map(|(s, row)| {
            let next = sample(&row, &s.sampling, &mut s.rng);
            s.tokens.push(next);
            next
        })
        .collect())
}

/// Refuses a row of logits with a NaN or an infinity (a model whose activations overflow):
/// an [`Error::NonFiniteOutput`] naming the generation step (0 for the first new token)
/// and, in a batched step, the sequence.
fn finite_logits(row: &[f32], step: usize, seq: Option<usize>) -> Result<()> {
    let Some((t, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) else {
        return Ok(());
    };
    let seq = seq.map_or(String::new(), |i| format!(" (sequence {i} of the batch)"));
    Err(Error::NonFiniteOutput(format!(
        "non-finite logits at step {step} of generation{seq} ({v} for token {t}): the model's \
         output overflowed; its weights may be finite but are too large"
    )))
}

/// Picks a token id from `logits` under `s`.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = |xs: &[f32]| {
        xs.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.greedy {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / s.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = s.top_p {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                cum += q;
                cum >= p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut u = rng.uniform();
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return order[i] as u32;
        }
        u -= q;
    }
    order[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::params::Params;
    use candle_core::Device;

    #[test]
    fn cached_generation_equals_recomputation() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 40, "input": {"kind": "bytes"},
               "head": {"kind": "lm"}, "causal": true, "defaults": {"mixer": {"kind": "attention", "q_chunk": 4, "k_chunk": 4}}}"#,
        )
        .unwrap();
        let model = Model::new(&cfg, &Params::new(9, DType::F32, &Device::Cpu).frozen()).unwrap();
        for s in [
            Sampling {
                greedy: true,
                ..Default::default()
            },
            Sampling {
                temperature: 0.8,
                top_k: Some(20),
                top_p: Some(0.9),
                seed: 4,
                ..Default::default()
            },
        ] {
            let prompt: Vec<u32> = b"to be".iter().map(|&c| u32::from(c)).collect();
            let a = generate(&model, &prompt, 20, &s, true, |_| {}).unwrap();
            let b = generate(&model, &prompt, 20, &s, false, |_| {}).unwrap();
            assert_eq!(a, b);
        }
    }

    /// Three sequences of different lengths joining at steps 0, 2 and 3 and leaving when
    /// done, decoded together, give each the tokens it gets alone (greedy and seeded
    /// sampling), for every causal mixer and the position and residual schemes that reach
    /// into the mixers.
    #[test]
    fn sequences_decoded_together_equal_each_decoded_alone() {
        use crate::mixer::MixerSpec;
        let mut configs: Vec<(String, String)> = MixerSpec::examples()
            .into_iter()
            .filter(|m| m.kind().capabilities().causal)
            .map(|m| {
                (
                    m.kind().name().to_string(),
                    serde_json::to_string(&m).unwrap(),
                )
            })
            .map(|(name, mixer)| (name, format!(r#""defaults": {{"mixer": {mixer}}}"#)))
            .collect();
        let attention =
            r#""defaults": {"mixer": {"kind": "attention", "q_chunk": 4, "k_chunk": 4}}"#;
        configs.push((
            "rope + value residual".into(),
            format!(r#"{attention}, "position": {{"kind": "rope"}}, "residual": {{"kind": "value_residual", "lambda": 0.5}}"#),
        ));
        configs.push((
            "alibi + denseformer".into(),
            format!(r#"{attention}, "position": {{"kind": "alibi"}}, "residual": {{"kind": "dense_former"}}"#),
        ));
        assert!(configs.len() >= 6, "{configs:?}");
        let prompts: [&[u8]; 3] = [b"to be", b"or not to be, that is", b"x"];
        let (max_new, join) = ([12, 6, 9], [0, 2, 3]);
        let ids = |p: &[u8]| p.iter().map(|&c| u32::from(c)).collect::<Vec<u32>>();
        for (name, extra) in &configs {
            let cfg = ModelConfig::from_json(&format!(
                r#"{{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 40, "input": {{"kind": "bytes"}},
                   "head": {{"kind": "lm"}}, "causal": true, {extra}}}"#
            ))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let model =
                Model::new(&cfg, &Params::new(3, DType::F32, &Device::Cpu).frozen()).unwrap();
            let sampled = Sampling {
                temperature: 0.9,
                top_p: Some(0.95),
                seed: 7,
                ..Default::default()
            };
            for s in [
                Sampling {
                    greedy: true,
                    ..Default::default()
                },
                sampled,
            ] {
                let mut seqs: Vec<Sequence> = prompts
                    .iter()
                    .zip(max_new)
                    .map(|(p, n)| Sequence::new(&model, &ids(p), n, &s).unwrap())
                    .collect();
                let mut widest = 0;
                for t in 0..20 {
                    let mut active: Vec<&mut Sequence> = seqs
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, q)| join[*i] <= t && !q.finished())
                        .map(|(_, q)| q)
                        .collect();
                    widest = widest.max(active.len());
                    if !active.is_empty() {
                        step(&model, &mut active).unwrap();
                    }
                }
                assert_eq!(widest, 3, "{name}");
                for (i, q) in seqs.iter().enumerate() {
                    let alone = generate(&model, &ids(prompts[i]), max_new[i], &s, true, |_| {});
                    assert_eq!(q.generated(), alone.unwrap(), "{name}, sequence {i}, {s:?}");
                }
                let e = step(&model, &mut [&mut seqs[1]]).unwrap_err();
                assert!(e.to_string().contains("already has its 6 tokens"), "{e}");
            }
        }
    }

    /// Past the window, each token is the one a fresh generation from the last `window`
    /// tokens gives, cached or not; within it, sliding generation is plain generation.
    #[test]
    fn sliding_generation_predicts_each_token_from_the_last_window() {
        for position in ["learned", "rope"] {
            let cfg = ModelConfig::from_json(&format!(
                r#"{{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 12, "input": {{"kind": "bytes"}},
                   "head": {{"kind": "lm"}}, "causal": true, "position": {{"kind": "{position}"}},
                   "defaults": {{"mixer": {{"kind": "attention", "q_chunk": 4, "k_chunk": 4}}}}}}"#
            ))
            .unwrap();
            let model =
                Model::new(&cfg, &Params::new(5, DType::F32, &Device::Cpu).frozen()).unwrap();
            let prompt: Vec<u32> = b"to be".iter().map(|&c| u32::from(c)).collect();
            let greedy = Sampling {
                greedy: true,
                ..Default::default()
            };
            let slide = |n, window, s: &Sampling, cache| {
                generate_sliding(&model, &prompt, n, window, s, cache, |_| true).unwrap()
            };
            let within = generate(&model, &prompt, 7, &greedy, true, |_| {}).unwrap();
            assert_eq!(slide(7, 12, &greedy, true), within, "{position}");
            for window in [8, 12] {
                let long = slide(30, window, &greedy, true);
                assert_eq!(long.len(), 30);
                assert_eq!(long, slide(30, window, &greedy, false), "{position}");
                let all: Vec<u32> = prompt.iter().chain(&long).copied().collect();
                for i in prompt.len()..all.len() {
                    let ctx = &all[i.saturating_sub(window)..i];
                    let logits = model
                        .forward(&ids_tensor(ctx).unwrap(), None, None)
                        .unwrap();
                    let last = logits.narrow(1, ctx.len() - 1, 1).unwrap();
                    let last: Vec<f32> = last.flatten_all().unwrap().to_vec1().unwrap();
                    let want = sample(&last, &greedy, &mut Rng::new(0));
                    assert_eq!(want, all[i], "{position}, window {window}, token {i}");
                }
            }
            let sampled = Sampling {
                temperature: 0.8,
                top_k: Some(20),
                seed: 3,
                ..Default::default()
            };
            assert_eq!(
                slide(25, 12, &sampled, true),
                slide(25, 12, &sampled, false),
                "{position}"
            );
            // Only the prompt is bounded, by max_len.
            let e = generate_sliding(&model, &[1; 13], 1, 12, &greedy, true, |_| true);
            assert!(e.unwrap_err().to_string().contains("max_len 12"));
        }
    }

    /// A causal LM whose finite weights overflow: generating (cached, recomputed, sliding
    /// or batched with `step`) is an error naming the step, never a sampled token.
    #[test]
    fn non_finite_logits_are_an_error_naming_the_step() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "max_len": 16, "input": {"kind": "bytes"},
               "head": {"kind": "lm"}, "causal": true}"#,
        )
        .unwrap();
        let p = Params::new(2, DType::F32, &Device::Cpu).frozen();
        Model::new(&cfg, &p).unwrap();
        for (_, var) in p.vars() {
            let big = candle_core::Tensor::full(3e38f32, var.dims(), &Device::Cpu).unwrap();
            var.set(&big).unwrap();
        }
        let model = Model::new(&cfg, &p).unwrap();
        let greedy = Sampling {
            greedy: true,
            ..Default::default()
        };
        let want = "non-finite logits at step 0 of generation";
        for cache in [true, false] {
            let mut seen = Vec::new();
            let e = generate(&model, &[1, 2, 3], 4, &greedy, cache, |t| seen.push(t)).unwrap_err();
            assert!(matches!(e, Error::NonFiniteOutput(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e}");
            assert!(seen.is_empty(), "{seen:?}");
            let e = generate_sliding(&model, &[1, 2], 30, 8, &greedy, cache, |_| true);
            assert!(e.unwrap_err().to_string().contains(want));
        }
        let mut a = Sequence::new(&model, &[1, 2], 3, &greedy).unwrap();
        let mut b = Sequence::new(&model, &[3], 3, &greedy).unwrap();
        let e = step(&model, &mut [&mut a, &mut b]).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("sequence 0 of the batch"),
            "{e}"
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        let k1 = Sampling {
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &k1, &mut rng) == 1));
        let nucleus = Sampling {
            top_p: Some(0.9),
            ..Default::default()
        };
        let picks: Vec<u32> = (0..500)
            .map(|_| sample(&logits, &nucleus, &mut rng))
            .collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn prompts_past_max_len_are_errors() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "max_len": 8, "input": {"kind": "bytes"},
               "head": {"kind": "lm"}, "causal": true}"#,
        )
        .unwrap();
        let model = Model::new(&cfg, &Params::new(9, DType::F32, &Device::Cpu).frozen()).unwrap();
        let e = generate(&model, &[1, 2, 3], 6, &Sampling::default(), true, |_| {}).unwrap_err();
        assert!(e.to_string().contains("max_len 8"), "{e}");
        // A count that would wrap `prompt.len() + max_new` is refused, not a panic.
        let e = generate(&model, &[1], usize::MAX, &Sampling::default(), true, |_| {}).unwrap_err();
        assert!(e.to_string().contains("max_len 8"), "{e}");
    }

    #[test]
    fn sampling_values_that_cannot_sample_are_refused_by_name() {
        let bad = [
            (
                "top_p",
                Sampling {
                    top_p: Some(2.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                Sampling {
                    top_p: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                Sampling {
                    top_p: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            (
                "temperature",
                Sampling {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                Sampling {
                    temperature: -1.0,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                Sampling {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "top_k",
                Sampling {
                    top_k: Some(0),
                    ..Default::default()
                },
            ),
        ];
        for (key, s) in bad {
            match s.validate() {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{s:?}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
        let edge = Sampling {
            top_p: Some(1.0),
            top_k: Some(1),
            ..Default::default()
        };
        edge.validate().unwrap();
    }
}

//! Bounded property tests over every loader: valid seed inputs mutated (bit flips, cuts,
//! duplicated and deleted bytes, numbers replaced by edge cases and by values of the wrong
//! type) and random bytes. Each case must return `Ok` or an error with a message, within
//! [`LIMIT`](super::guard::LIMIT): no panic, no hang. Numbers are replaced from [`mutate::SMALL`] so that a
//! failure points at a loader, not at a size the input legitimately asks for; the
//! [`mutate::HUGE`] runs check the size bounds.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::mutate::{mutate, HUGE, SMALL};
use super::*;

/// Runs one case through [`guarded`], failing it with its message.
fn check(
    input: &[u8],
    load: impl FnOnce(&[u8]) -> Outcome + Send + 'static,
) -> Result<(), TestCaseError> {
    guarded(input, load).map_err(TestCaseError::fail)
}

/// A recipe of up to `steps` mutation steps.
fn recipe(steps: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 4..=4 * steps)
}

/// Random bytes, and random printable text shaped like JSON.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..512),
        "[{}\\[\\]\":,0-9a-z_ .eE+-]{0,256}".prop_map(String::into_bytes),
    ]
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        // One fixed stream of cases: `cargo test` must not pass or fail by luck.
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed),
        ..ProptestConfig::default()
    }
}

/// The safetensors header (length prefix and JSON) of `file`, and the rest.
fn split_header(file: &[u8]) -> (&[u8], &[u8]) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    file.split_at(8 + n)
}

const CONFIG_JSON: &[&str] = &[
    include_str!("../../../../configs/reverse.json"),
    include_str!("../../../../configs/charlm.json"),
    include_str!("../../../../configs/encoder-classifier.json"),
    include_str!("../../../../configs/masformer.json"),
    include_str!("../../../../configs/matformer-lm.json"),
    include_str!("../../../../configs/performer-lm.json"),
    include_str!("../../../../configs/poolformer.json"),
    include_str!("../../../../configs/lrt.json"),
    TINY_RUN,
];

const CONFIG_TOML: &str = include_str!("../../../../configs/copy-rope-swiglu.toml");

#[test]
fn the_seeds_load() {
    assert!(fixtures().len() >= 2);
    for f in fixtures() {
        let name = f.family.name();
        let one = std::slice::from_ref(f);
        assert_eq!(safetensors_in(one, f.weights).err(), None, "{name}");
        assert_eq!(hf_config_in(f, f.config).err(), None, "{name}");
        assert_eq!(tokenizer(f.tokenizer).err(), None, "{name}");
    }
    for c in CONFIG_JSON {
        assert_eq!(run_config(Format::Json, c.as_bytes()).err(), None, "{c}");
    }
    assert_eq!(run_config(Format::Toml, CONFIG_TOML.as_bytes()).err(), None);
    assert_eq!(run_state(&run_state_seed()).err(), None);
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn safetensors_headers(r in recipe(6)) {
        for f in fixtures() {
            let (head, data) = split_header(f.weights);
            let mut file = mutate(head, &r, SMALL);
            file.extend_from_slice(data);
            check(&file, safetensors)?;
        }
    }

    #[test]
    fn safetensors_files(r in recipe(4)) {
        for f in fixtures() {
            check(&mutate(f.weights, &r, SMALL), safetensors)?;
        }
    }

    #[test]
    fn hf_configs(r in recipe(6)) {
        for &f in fixtures() {
            check(&mutate(f.config, &r, SMALL), move |b| hf_config_in(&f, b))?;
        }
    }

    #[test]
    fn tokenizers(r in recipe(6)) {
        for f in fixtures() {
            check(&mutate(f.tokenizer, &r, SMALL), tokenizer)?;
        }
    }

    #[test]
    fn config_json(r in recipe(6), i in 0..CONFIG_JSON.len()) {
        check(&mutate(CONFIG_JSON[i].as_bytes(), &r, SMALL), |b| run_config(Format::Json, b))?;
    }

    #[test]
    fn config_toml(r in recipe(6)) {
        check(&mutate(CONFIG_TOML.as_bytes(), &r, SMALL), |b| run_config(Format::Toml, b))?;
    }

    #[test]
    fn run_states(r in recipe(4)) {
        check(&mutate(&run_state_seed(), &r, SMALL), run_state)?;
    }

    #[test]
    fn noise_everywhere(bytes in noise()) {
        check(&bytes, safetensors)?;
        check(&bytes, hf_config)?;
        check(&bytes, tokenizer)?;
        check(&bytes, |b| run_config(Format::Json, b))?;
        check(&bytes, |b| run_config(Format::Toml, b))?;
        check(&bytes, run_state)?;
    }
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn huge_numbers_in_hf_configs(r in recipe(3)) {
        for &f in fixtures() {
            check(&mutate(f.config, &r, HUGE), move |b| hf_config_in(&f, b))?;
        }
    }

    #[test]
    fn huge_numbers_in_formers_configs(r in recipe(3), i in 0..CONFIG_JSON.len()) {
        check(&mutate(CONFIG_JSON[i].as_bytes(), &r, HUGE), |b| run_config(Format::Json, b))?;
        check(&mutate(CONFIG_TOML.as_bytes(), &r, HUGE), |b| run_config(Format::Toml, b))?;
    }

    #[test]
    fn huge_numbers_in_safetensors_headers_and_states(r in recipe(3)) {
        for f in fixtures() {
            let (head, data) = split_header(f.weights);
            let mut file = mutate(head, &r, HUGE);
            file.extend_from_slice(data);
            check(&file, safetensors)?;
        }
        check(&mutate(&run_state_seed(), &r, HUGE), run_state)?;
    }
}

/// `fuzz/seeds/run_state/state.json` is [`run_state_seed`] (written anew when
/// `FORMERS_WRITE_SEEDS` is set).
#[test]
fn the_committed_run_state_seed_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/run_state/state.json");
    let seed = run_state_seed();
    if std::env::var_os("FORMERS_WRITE_SEEDS").is_some() {
        std::fs::write(&path, &seed).unwrap();
    }
    assert_eq!(std::fs::read(&path).ok(), Some(seed), "{}", path.display());
}

#[test]
fn fixed_fuzz_findings_stay_fixed() {
    let failed = replay_regressions(TARGETS, false);
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn open_fuzz_findings() {
    let failed = replay_regressions(TARGETS, true);
    assert!(failed.is_empty(), "{failed:#?}");
}

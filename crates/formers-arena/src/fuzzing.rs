//! `results.jsonl` fed arbitrary bytes, shared by the cargo-fuzz target `results_jsonl` in
//! `fuzz/` and the bounded property test below (compiled with the `fuzzing` feature, and for
//! this crate's tests). See `formers::fuzzing` for the other loaders.

use crate::report::{self, ReportMeta};
use crate::results::{self, Unique};

pub use formers::fuzzing::Outcome;

/// A results store read as the report reads it (one record per key), then rendered: every
/// table and chart of the report.
pub fn results_jsonl(bytes: &[u8]) -> Outcome {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let numbered = results::parse(text).map_err(|(line, e)| format!("line {line}: {e}"))?;
    let unique = Unique::new(numbered);
    let _ = unique.duplicates_note(std::path::Path::new(results::FILE));
    let _ = unique.invalid_notes(std::path::Path::new(results::FILE));
    let records = &unique.records;
    let meta = ReportMeta {
        title: "fuzz".into(),
        notes: Vec::new(),
        variant_order: vec!["vanilla".into()],
    };
    let _ = report::report_meta(None, records);
    let _ = report::table1_markdown(records, &meta);
    let _ = report::table2_markdown(records, &meta);
    let _ = report::details_markdown(records, &meta);
    let _ = report::charts(records, &meta);
    Ok(())
}

/// A small valid store: two runs (one of them twice), a speed measurement and a skipped task.
pub const RESULTS_SEED: &str = include_str!("../../../fuzz/seeds/results_jsonl/seed.jsonl");

#[cfg(test)]
mod tests {
    use formers::fuzzing::guarded;
    use formers::fuzzing::mutate::{mutate, HUGE, SMALL};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;

    fn check(input: &[u8]) -> Result<(), TestCaseError> {
        guarded(input, results_jsonl).map_err(TestCaseError::fail)
    }

    #[test]
    fn fixed_fuzz_findings_stay_fixed() {
        let failed =
            formers::fuzzing::replay_regressions(&[("results_jsonl", results_jsonl)], false);
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn the_seed_loads_with_its_duplicate() {
        let records = results::parse(RESULTS_SEED).unwrap();
        assert_eq!(Unique::new(records).duplicates.len(), 1);
        assert_eq!(results_jsonl(RESULTS_SEED.as_bytes()), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed), ..ProptestConfig::default() })]

        #[test]
        fn results_stores(r in vec(any::<u8>(), 4..24), huge in any::<bool>()) {
            let numbers = if huge { HUGE } else { SMALL };
            check(&mutate(RESULTS_SEED.as_bytes(), &r, numbers))?;
        }

        #[test]
        fn results_noise(bytes in vec(any::<u8>(), 0..512)) {
            check(&bytes)?;
        }
    }
}

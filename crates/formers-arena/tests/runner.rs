//! Integration tests of the arena runner: sharding and merging, surviving a kill, plans and
//! shards, budgets, skipped tasks, the contents of a run record and job directories that
//! one attempt at a time owns.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use formers_arena::jobdir::{self, JobDir};
use formers_arena::report::{self, ReportMeta};
use formers_arena::results::{self, Record, RunResult, SpeedResult};
use formers_arena::runner::{
    self, Budget, Concurrency, Event, Job, Options, Outcome, Progress, Tasks,
};
use formers_arena::suite::{self, DataDirs, SuiteSpec};
use formers_arena::task::{Setting, Split};
use formers_arena::variants;

/// A progress reporter that reports nothing.
struct Quiet;

impl Progress for Quiet {}

/// A fresh, process-unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "formers-arena-runner-{}-{name}",
            std::process::id()
        ));
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn store(&self) -> PathBuf {
        self.0.join(results::FILE)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A tiny lite arena: `steps` steps per run, speed measured at length 64 only, and a model
/// smaller than the lite suite's (tasks and splits are the lite ones; scoring the whole test
/// split dominates the time of a run).
fn options(tasks: &[&str], variant_names: &[&str], seeds: u64, steps: usize) -> Options {
    let mut suite = SuiteSpec::new(Setting::Lite);
    suite.d_model = 32;
    suite.n_heads = 2;
    suite.n_layers = 1;
    suite.batch_size = 8;
    suite.speed_lengths = vec![64];
    suite.speed_batch = 2;
    let names: Vec<String> = variant_names.iter().map(|s| s.to_string()).collect();
    Options {
        suite,
        tasks: tasks.iter().map(|s| s.to_string()).collect(),
        variants: variants::resolve(&names).unwrap(),
        budget: Budget::Steps(steps),
        seeds,
        shard: (1, 1),
        speed: true,
        data: DataDirs::default(),
    }
}

fn run_in(opts: &Options, dir: &Path) -> Outcome {
    let outcome = runner::run_in_process(opts, dir, &mut Quiet).unwrap();
    assert!(
        outcome.failed.is_empty(),
        "failed jobs: {:?}",
        outcome.failed
    );
    outcome
}

/// One job at a time, as `--jobs 1`.
fn one() -> Concurrency {
    Concurrency::new(1).unwrap()
}

/// An executor that ignores threads and progress: `f(job)`.
fn simple(
    f: impl Fn(&Job) -> Result<Record, String> + Sync,
) -> impl Fn(&Job, Option<usize>, &mut dyn FnMut(Event)) -> Result<Record, String> + Sync {
    move |job, _threads, _events| f(job)
}

fn keys(records: &[Record]) -> BTreeSet<String> {
    records.iter().map(Record::key).collect()
}

fn test_accuracies(records: &[Record]) -> BTreeMap<String, f64> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Run(run) => Some((r.key(), run.test_accuracy)),
            _ => None,
        })
        .collect()
}

fn meta(opts: &Options) -> ReportMeta {
    ReportMeta {
        title: "test".into(),
        notes: Vec::new(),
        variant_order: opts.variants.iter().map(|v| v.name.clone()).collect(),
    }
}

#[test]
fn sharded_runs_merged_give_the_same_table_as_one_run() {
    let opts = options(&["listops", "text"], &["vanilla", "poolformer"], 1, 2);
    let whole = TempDir::new("whole");
    let b1 = TempDir::new("shard1");
    let b2 = TempDir::new("shard2");

    let all = run_in(&opts, whole.path());
    let total = runner::plan(&opts).len();
    assert_eq!(total, 2 * 2 + 2, "4 runs and 2 speed jobs");
    assert_eq!(all.ran, total);
    assert_eq!(all.already_done, 0);

    let mut shard_keys = Vec::new();
    for (i, dir) in [(1, &b1), (2, &b2)] {
        let mut o = opts.clone();
        o.shard = (i, 2);
        let out = run_in(&o, dir.path());
        assert_eq!(out.ran, runner::shard(runner::plan(&o), i, 2).len());
        let stored = results::load(&dir.store()).unwrap();
        assert_eq!(stored.len(), out.ran);
        shard_keys.push(keys(&stored));
    }
    assert!(!shard_keys[0].is_empty() && !shard_keys[1].is_empty());
    assert!(
        shard_keys[0].is_disjoint(&shard_keys[1]),
        "shards overlap: {:?}",
        shard_keys[0]
            .intersection(&shard_keys[1])
            .collect::<Vec<_>>()
    );

    let merged = results::merge(&[b1.path().to_path_buf(), b2.path().to_path_buf()]).unwrap();
    let single = results::load(&whole.store()).unwrap();
    assert_eq!(single.len(), total);
    assert_eq!(merged.len(), total);
    assert_eq!(keys(&merged), keys(&single));
    let union: BTreeSet<String> = shard_keys[0].union(&shard_keys[1]).cloned().collect();
    assert_eq!(union, keys(&single));

    // Training is deterministic for a seed; speed numbers are not, so Table 1 is compared.
    let (acc_merged, acc_single) = (test_accuracies(&merged), test_accuracies(&single));
    assert_eq!(acc_merged.len(), 4);
    assert_eq!(acc_merged, acc_single);
    let m = meta(&opts);
    let t_merged = report::table1_markdown(&merged, &m);
    let t_single = report::table1_markdown(&single, &m);
    assert!(t_single.contains("vanilla") && t_single.contains("poolformer"));
    assert_eq!(t_merged, t_single);
}

#[test]
fn a_rerun_after_a_kill_does_not_redo_finished_runs() {
    let opts = options(&["listops", "text"], &["vanilla", "poolformer"], 1, 2);
    let dir = TempDir::new("kill");
    let work = dir.path().join("runs");
    let total = runner::plan(&opts).len();
    let k = 3;

    // First invocation: dies (panics) as it starts job k.
    let tasks = Tasks::default();
    let started = AtomicUsize::new(0);
    let killed = panic::catch_unwind(AssertUnwindSafe(|| {
        let exec = simple(|job: &Job| {
            if started.load(SeqCst) == k {
                panic!("simulated kill before job {k}");
            }
            started.fetch_add(1, SeqCst);
            runner::run_job(job, &opts, &tasks, &work, &mut |_| {})
        });
        runner::run_arena(
            &opts,
            dir.path(),
            &Tasks::default(),
            one(),
            &exec,
            &mut Quiet,
        )
    }));
    assert!(
        killed.is_err(),
        "the first invocation should have been killed"
    );
    assert_eq!(started.load(SeqCst), k);
    let before = fs::read_to_string(dir.store()).unwrap();
    let first_lines: Vec<&str> = before.lines().collect();
    assert_eq!(first_lines.len(), k);

    // Second invocation: only the unfinished jobs run (cheap stand-in records: what is
    // tested here is the runner's bookkeeping, not training).
    let ran_keys = Mutex::new(Vec::new());
    let exec = simple(|job: &Job| {
        ran_keys.lock().unwrap().push(job.key(&opts));
        Ok(stand_in(job, &opts))
    });
    let out = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    let ran_keys = ran_keys.lock().unwrap().clone();
    assert_eq!(ran_keys.len(), total - k);
    assert_eq!(out.ran, total - k);
    assert_eq!(out.already_done, k);
    assert_eq!(out.records.len(), total);

    let after = fs::read_to_string(dir.store()).unwrap();
    assert!(
        after.starts_with(&before),
        "records of the first invocation changed"
    );
    let lines: Vec<&str> = after.lines().collect();
    assert_eq!(lines.len(), total);
    assert_eq!(&lines[..k], &first_lines[..]);
    let stored = results::load(&dir.store()).unwrap();
    let unique = keys(&stored);
    assert_eq!(unique.len(), stored.len(), "a key appears twice");
    assert_eq!(unique, keys(&out.records));
    let first_keys: BTreeSet<String> = stored[..k].iter().map(Record::key).collect();
    let plan_keys: Vec<String> = runner::plan(&opts).iter().map(|j| j.key(&opts)).collect();
    assert_eq!(first_keys, plan_keys[..k].iter().cloned().collect());
    assert_eq!(ran_keys, plan_keys[k..]);

    // A third invocation has nothing left to do.
    let calls = AtomicUsize::new(0);
    let exec = simple(|_: &Job| -> Result<Record, String> {
        calls.fetch_add(1, SeqCst);
        Err("nothing should run".into())
    });
    let out = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(
        (calls.load(SeqCst), out.ran, out.already_done),
        (0, 0, total)
    );
    assert_eq!(fs::read_to_string(dir.store()).unwrap(), after);
}

/// A record that costs nothing to make.
fn fake_run(task: &str, seed: u64) -> Record {
    Record::Run(RunResult {
        suite: "lite".into(),
        task: task.into(),
        variant: "vanilla".into(),
        seed,
        budget: "2".into(),
        source: "generated".into(),
        seq_len: 64,
        batch_size: 2,
        steps: 2,
        test_accuracy: 0.5,
        test_examples: 10,
        majority_accuracy: None,
        val_accuracy: 0.5,
        train_steps_per_s: 1.0,
        threads: 1,
        infer_tokens_per_s: 1.0,
        peak_rss_bytes: 1,
        params: 1,
        flops_per_token: 1.0,
        wall_s: 1.0,
        loss_curve: vec![(1, 1.0), (2, 0.5)],
    })
}

/// A record with the key `job` makes, without running it.
fn stand_in(job: &Job, opts: &Options) -> Record {
    let rec = match job {
        Job::Run {
            task,
            variant,
            seed,
        } => {
            let Record::Run(mut r) = fake_run(task, *seed) else {
                unreachable!()
            };
            r.variant = variant.clone();
            r.budget = opts.budget.label(&opts.suite, &r.task);
            Record::Run(r)
        }
        Job::Speed { variant, length } => Record::Speed(SpeedResult {
            suite: opts.suite.setting.name().into(),
            variant: variant.clone(),
            length: *length,
            batch_size: opts.suite.speed_batch,
            steps_per_s: 1.0,
            peak_rss_bytes: 1,
            params: 1,
        }),
    };
    assert_eq!(rec.key(), job.key(opts));
    rec
}

#[test]
fn a_last_line_cut_by_a_kill_loads() {
    let dir = TempDir::new("cut-load");
    fs::create_dir_all(dir.path()).unwrap();
    let store = dir.store();
    let recs = [fake_run("listops", 0), fake_run("text", 0)];
    for r in &recs {
        results::append(&store, r).unwrap();
    }
    let line = serde_json::to_string(&fake_run("text", 1)).unwrap();
    let mut text = fs::read_to_string(&store).unwrap();
    text.push_str(&line[..line.len() / 2]);
    fs::write(&store, &text).unwrap();
    assert_eq!(results::load(&store).unwrap(), recs.to_vec());

    // A cut line that is not the last one is an error naming the line.
    fs::write(&store, format!("{text}\n{line}\n")).unwrap();
    let err = results::load(&store).unwrap_err();
    assert!(err.contains(":3:"), "{err}");
}

// Fails today: `results::append` starts its record on a fresh line after the cut one, which
// leaves the cut line in the middle of the file, where `results::load` rejects it.
#[test]
fn an_append_after_a_cut_last_line_leaves_a_valid_file() {
    let dir = TempDir::new("cut-append");
    fs::create_dir_all(dir.path()).unwrap();
    let store = dir.store();
    let first = fake_run("listops", 0);
    results::append(&store, &first).unwrap();
    let line = serde_json::to_string(&fake_run("text", 1)).unwrap();
    let mut text = fs::read_to_string(&store).unwrap();
    text.push_str(&line[..line.len() / 2]);
    fs::write(&store, &text).unwrap();

    let next = fake_run("text", 0);
    results::append(&store, &next).unwrap();
    let loaded = results::load(&store);
    assert_eq!(loaded, Ok(vec![first.clone(), next.clone()]));
    // Every line of the file is a record.
    for l in fs::read_to_string(&store).unwrap().lines() {
        serde_json::from_str::<Record>(l).unwrap_or_else(|e| panic!("bad line `{l}`: {e}"));
    }
    // And so is the next append.
    let third = fake_run("listops", 1);
    results::append(&store, &third).unwrap();
    assert_eq!(results::load(&store), Ok(vec![first, next, third]));

    // The same through the runner: killed while writing, then rerun twice.
    let opts = options(&["listops"], &["vanilla", "poolformer"], 1, 2);
    let arena = TempDir::new("cut-arena");
    let exec = simple(|job: &Job| Ok(stand_in(job, &opts)));
    let once = runner::run_arena(
        &opts,
        arena.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(once.ran, 4);
    let mut text = fs::read_to_string(arena.store()).unwrap();
    let last = text.trim_end().rsplit('\n').next().unwrap().to_string();
    text.truncate(text.len() - last.len() / 2 - 1);
    fs::write(arena.store(), &text).unwrap();
    let rerun = runner::run_arena(
        &opts,
        arena.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!((rerun.ran, rerun.already_done), (1, 3));
    let again = runner::run_arena(
        &opts,
        arena.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .expect("the store stays readable after a rerun");
    assert_eq!((again.ran, again.already_done), (0, 4));
}

#[test]
fn shards_are_disjoint_and_cover_the_plan() {
    let mut opts = options(
        &["listops", "text", "retrieval"],
        &["vanilla", "poolformer", "local"],
        2,
        2,
    );
    opts.suite.speed_lengths = vec![64, 128];
    let plan = runner::plan(&opts);
    assert_eq!(plan.len(), 3 * 3 * 2 + 3 * 2);
    let plan_keys: BTreeSet<String> = plan.iter().map(|j| j.key(&opts)).collect();
    assert_eq!(plan_keys.len(), plan.len(), "plan keys are unique");
    assert_eq!(
        plan.iter()
            .filter(|j| matches!(j, Job::Speed { .. }))
            .count(),
        6
    );

    for n in 1..=4 {
        let shards: Vec<Vec<Job>> = (1..=n).map(|i| runner::shard(plan.clone(), i, n)).collect();
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), plan.len(), "n = {n}");
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "unbalanced shards {sizes:?}"
        );
        let mut seen = BTreeSet::new();
        for s in &shards {
            assert!(!s.is_empty());
            for j in s {
                assert!(seen.insert(j.key(&opts)), "{j:?} in two shards of {n}");
            }
        }
        assert_eq!(seen, plan_keys, "n = {n}");
        // Each shard keeps plan order.
        for s in &shards {
            let pos: Vec<usize> = s
                .iter()
                .map(|j| plan.iter().position(|p| p == j).unwrap())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]));
        }
    }
    assert_eq!(runner::shard(plan.clone(), 1, 1), plan);

    let dir = TempDir::new("bad-shard");
    for bad in [(0, 2), (3, 2), (1, 0), (0, 0)] {
        let mut o = opts.clone();
        o.shard = bad;
        let exec = simple(|j: &Job| -> Result<Record, String> { panic!("ran {j:?}") });
        let err = runner::run_arena(&o, dir.path(), &Tasks::default(), one(), &exec, &mut Quiet)
            .unwrap_err();
        assert!(err.contains("shard"), "{err}");
        assert!(!dir.path().exists(), "an invalid shard created the arena");
    }
}

#[test]
fn budgets_parse() {
    assert_eq!(Budget::parse("300"), Ok(Budget::Steps(300)));
    assert_eq!(Budget::parse(" 300 "), Ok(Budget::Steps(300)));
    assert_eq!(Budget::parse("2m"), Ok(Budget::Minutes(2.0)));
    assert_eq!(Budget::parse("2min"), Ok(Budget::Minutes(2.0)));
    assert_eq!(Budget::parse("1.5min"), Ok(Budget::Minutes(1.5)));
    assert_eq!(Budget::parse("1.5m"), Ok(Budget::Minutes(1.5)));
    assert_eq!(Budget::parse("90s"), Ok(Budget::Minutes(1.5)));
    for bad in ["0", "-1", "abc", "2h", "", "0m", "-2m", "0s", "m", "1.5"] {
        let err = Budget::parse(bad).unwrap_err();
        assert!(err.contains("budget"), "`{bad}`: {err}");
    }
    assert_eq!(Budget::Steps(300).summary(), "300");
    assert_eq!(Budget::Minutes(1.5).summary(), "1.5m");
    assert_eq!(
        Budget::parse(&Budget::Minutes(2.0).summary()),
        Ok(Budget::Minutes(2.0))
    );
}

#[test]
fn the_default_budget_is_the_suites_steps_per_task_and_keys_runs_by_them() {
    let lite = SuiteSpec::new(Setting::Lite);
    // Every default task of the lite suite has steps of its own, and they differ by task.
    let steps: BTreeSet<usize> = suite::DEFAULT_TASKS
        .iter()
        .filter(|t| **t != "image")
        .map(|t| {
            assert!(lite.task_steps.contains_key(*t), "no steps for {t}");
            Budget::Suite.steps(&lite, t).unwrap()
        })
        .collect();
    assert!(steps.len() > 1, "{steps:?}");
    let listops = lite.steps("listops");
    assert_eq!(Budget::Suite.label(&lite, "listops"), listops.to_string());
    // A task without its own steps falls back to the suite's default.
    assert_eq!(lite.steps("pathx"), lite.default_steps);
    // Explicit budgets apply to every task.
    assert_eq!(Budget::Steps(7).steps(&lite, "listops"), Some(7));
    assert_eq!(Budget::Minutes(2.0).steps(&lite, "listops"), None);
    assert_eq!(Budget::Minutes(2.0).label(&lite, "listops"), "2m");
    // A default run and `--budget N` with the same steps make the same record key.
    let mut o = options(&["listops"], &["vanilla"], 1, 1);
    let job = Job::Run {
        task: "listops".into(),
        variant: "vanilla".into(),
        seed: 0,
    };
    o.budget = Budget::Suite;
    let default_key = job.key(&o);
    o.budget = Budget::Steps(o.suite.steps("listops"));
    assert_eq!(job.key(&o), default_key);
    o.budget = Budget::Steps(o.suite.steps("listops") + 1);
    assert_ne!(job.key(&o), default_key);
}

/// The cells of the row of `variant` in our Table 1 (the first table), by column title.
fn table1_row(markdown: &str, variant: &str) -> BTreeMap<String, String> {
    let ours = markdown.split("**LRA paper").next().unwrap();
    let rows: Vec<Vec<String>> = ours
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let header = &rows[0];
    let row = rows
        .iter()
        .find(|r| r[0] == variant)
        .unwrap_or_else(|| panic!("no row `{variant}` in\n{ours}"));
    header.iter().cloned().zip(row.iter().cloned()).collect()
}

const CIFAR_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

#[test]
fn a_task_without_its_data_is_skipped_and_the_others_run() {
    if std::env::var_os("FORMERS_CIFAR10_DIR").is_some() {
        std::env::remove_var("FORMERS_CIFAR10_DIR");
    }
    let mut opts = options(&["image", "listops"], &["vanilla"], 1, 2);
    opts.speed = false;
    let dir = TempDir::new("skip");
    let mut skipped = Vec::new();
    struct Notes<'a>(&'a mut Vec<String>);
    impl Progress for Notes<'_> {
        fn skipped(&mut self, task: &str, _reason: &str) {
            self.0.push(task.to_string());
        }
    }
    let out = runner::run_in_process(&opts, dir.path(), &mut Notes(&mut skipped)).unwrap();
    assert_eq!(skipped, ["image"]);
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(out.ran, 1);

    let stored = results::load(&dir.store()).unwrap();
    assert_eq!(stored.len(), 2);
    let skip: Vec<_> = stored
        .iter()
        .filter_map(|r| match r {
            Record::Skipped(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(skip.len(), 1);
    assert_eq!(
        (skip[0].task.as_str(), skip[0].suite.as_str()),
        ("image", "lite")
    );
    assert!(skip[0].reason.contains(CIFAR_URL), "{}", skip[0].reason);
    let runs: Vec<_> = stored
        .iter()
        .filter_map(|r| match r {
            Record::Run(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].task, "listops");

    let md = report::table1_markdown(&stored, &meta(&opts));
    let row = table1_row(&md, "vanilla");
    assert_eq!(
        row.get("Image").map(String::as_str),
        Some("skipped"),
        "{md}"
    );
    let listops = row.get("ListOps").expect("a ListOps column");
    // A number, marked "(at chance)" when the tiny run learned nothing.
    let number = listops.split(' ').next().unwrap_or_default();
    assert!(number.parse::<f64>().is_ok(), "ListOps cell `{listops}`");
    assert!(
        md.contains(CIFAR_URL),
        "the footnote names the download:\n{md}"
    );

    // A rerun neither redoes the run nor records the skip twice.
    let again = runner::run_in_process(&opts, dir.path(), &mut Quiet).unwrap();
    assert_eq!((again.ran, again.already_done), (0, 1));
    assert_eq!(results::load(&dir.store()).unwrap(), stored);
}

#[test]
fn a_trained_run_record_is_sane() {
    let steps = 3;
    let opts = options(&["listops"], &["vanilla"], 1, steps);
    let dir = TempDir::new("sane");
    let job = Job::Run {
        task: "listops".into(),
        variant: "vanilla".into(),
        seed: 0,
    };
    let mut events = Vec::new();
    let rec = runner::run_job(
        &job,
        &opts,
        &Tasks::default(),
        dir.path(),
        &mut |e: Event| events.push(e),
    )
    .unwrap();
    assert_eq!(rec.key(), job.key(&opts));
    let Record::Run(r) = rec else {
        panic!("expected a run record, got {rec:?}")
    };
    let task = suite::open_task("listops", Setting::Lite, &DataDirs::default()).unwrap();

    assert_eq!((r.suite.as_str(), r.task.as_str()), ("lite", "listops"));
    assert_eq!((r.variant.as_str(), r.seed), ("vanilla", 0));
    assert_eq!(r.budget, "3");
    assert_eq!(r.test_examples, task.len(Split::Test));
    assert!(r.test_examples > 0);
    assert_eq!(r.seq_len, task.max_len());
    assert_eq!(r.batch_size, opts.suite.batch_size);
    assert!(
        (0.0..=1.0).contains(&r.test_accuracy),
        "{}",
        r.test_accuracy
    );
    assert!((0.0..=1.0).contains(&r.val_accuracy), "{}", r.val_accuracy);
    assert_eq!(r.steps, steps);
    assert!(r.params > 0);
    assert!(r.flops_per_token > 0.0 && r.flops_per_token.is_finite());
    assert_eq!(r.loss_curve.len(), steps, "{:?}", r.loss_curve);
    assert!(r.loss_curve.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(r.loss_curve.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    if cfg!(target_os = "linux") {
        assert!(r.peak_rss_bytes > 0);
    }
    assert!(r.train_steps_per_s > 0.0 && r.train_steps_per_s.is_finite());
    assert!(r.infer_tokens_per_s > 0.0);
    assert!(r.wall_s > 0.0);
    assert!(!r.source.is_empty());

    // Progress: a start, one event per step, then testing.
    assert_eq!(events.first(), Some(&Event::Start { steps }));
    let step_events = events
        .iter()
        .filter(|e| matches!(e, Event::Step { .. }))
        .count();
    assert_eq!(step_events, steps);
    let total = r.test_examples;
    assert_eq!(events.last(), Some(&Event::Testing { done: total, total }));
}

/// The steps of the loss lines of run directory `run`'s metrics.
fn metric_steps(run: &Path) -> Vec<u64> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

/// Leaves what an earlier attempt at `job` left: a lock naming `pid` and stray files.
fn leftovers(job: &Path, pid: u32) {
    fs::create_dir_all(job.join("checkpoint.tmp")).unwrap();
    fs::write(job.join("checkpoint.tmp/state.json"), "{").unwrap();
    fs::write(job.join("metrics.jsonl"), "{\"step\":7,\"loss\":1.0}\n").unwrap();
    fs::write(jobdir::lock_path(job), format!("{pid}\n")).unwrap();
}

#[cfg(unix)]
#[test]
fn a_rerun_waits_for_a_live_owner_and_never_mixes_two_attempts_files() {
    use std::process::Command;
    use std::time::{Duration, Instant};

    let steps = 2;
    let mut opts = options(&["listops"], &["vanilla"], 1, steps);
    opts.speed = false;
    let dir = TempDir::new("jobdir");
    let work = dir.path().join("runs");
    let job = Job::Run {
        task: "listops".into(),
        variant: "vanilla".into(),
        seed: 0,
    };
    let run_dir = work.join(job.label());
    let tasks = Tasks::default();
    let clean = |run_dir: &Path| {
        assert_eq!(
            metric_steps(run_dir),
            [1, 2],
            "metrics of two attempts mixed"
        );
        assert!(
            !run_dir.join("checkpoint.tmp").exists(),
            "an old attempt's file is left"
        );
        assert!(run_dir.join("checkpoint/state.json").is_file());
        assert!(
            !jobdir::lock_path(run_dir).exists(),
            "the lock outlived the job"
        );
    };

    // An earlier attempt still running: its directory is not touched while it lives.
    let mut owner = Command::new("sleep").arg("30").spawn().unwrap();
    leftovers(&run_dir, owner.id());
    let err = JobDir::claim_within(&run_dir, Duration::from_millis(200)).unwrap_err();
    assert!(err.contains(&owner.id().to_string()), "{err}");
    assert_eq!(
        metric_steps(&run_dir),
        [7],
        "a live owner's files were touched"
    );
    // Once it is gone, the job runs in an emptied directory.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        owner.kill().unwrap();
        owner.wait().unwrap();
    });
    let start = Instant::now();
    runner::run_job(&job, &opts, &tasks, &work, &mut |_| {}).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "did not wait for the owner"
    );
    killer.join().unwrap();
    clean(&run_dir);

    // An attempt that died: its lock is taken over and its files removed.
    let mut dead = Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    leftovers(&run_dir, dead.id());
    runner::run_job(&job, &opts, &tasks, &work, &mut |_| {}).unwrap();
    clean(&run_dir);
}

/// A process that exited (its pid is dead, and reaped).
#[cfg(unix)]
fn dead_pid() -> u32 {
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    dead.id()
}

#[cfg(unix)]
#[test]
fn a_second_arena_on_a_directory_is_refused_and_a_dead_ones_lock_taken_over() {
    use std::process::Command;

    let mut opts = options(&["listops"], &["vanilla"], 1, 2);
    opts.speed = false;
    let dir = TempDir::new("dirlock");
    fs::create_dir_all(dir.path()).unwrap();
    let lock = dir.path().join(runner::LOCK_FILE);
    let exec = simple(|job: &Job| Ok(stand_in(job, &opts)));

    // Another arena lives and holds the directory: refused at once, naming it, nothing run.
    let mut first = Command::new("sleep").arg("30").spawn().unwrap();
    fs::write(&lock, format!("{}\n", first.id())).unwrap();
    let err = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap_err();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(err.contains(&format!("process {}", first.id())), "{err}");
    assert!(err.contains(&lock.display().to_string()), "{err}");
    assert!(!err.contains('\n'), "not one line: {err}");
    assert!(!dir.store().exists(), "the refused arena wrote results");

    // Its owner died (a kill leaves the lock): taken over, and removed at the end.
    fs::write(&lock, format!("{}\n", dead_pid())).unwrap();
    let out = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        one(),
        &exec,
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(out.ran, 1);
    assert!(!lock.exists(), "the lock outlived the arena");

    // While an arena runs, its directory is locked with its pid.
    let seen = Mutex::new(None);
    let exec = simple(|job: &Job| {
        *seen.lock().unwrap() = jobdir::owner(&lock);
        Ok(stand_in(job, &opts))
    });
    let mut o = opts.clone();
    o.seeds = 2;
    runner::run_arena(&o, dir.path(), &Tasks::default(), one(), &exec, &mut Quiet).unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(std::process::id()));
}

#[test]
fn a_report_flags_a_key_stored_twice_and_reports_its_first_record() {
    let dir = TempDir::new("dup-report");
    fs::create_dir_all(dir.path()).unwrap();
    let store = dir.store();
    let first = fake_run("listops", 0);
    let Record::Run(mut again) = first.clone() else {
        unreachable!()
    };
    again.test_accuracy = 0.9;
    for r in [&first, &fake_run("text", 0), &Record::Run(again)] {
        results::append(&store, r).unwrap();
    }
    let unique = results::load_unique(&store).unwrap();
    assert_eq!(unique.records.len(), 2);
    assert_eq!(unique.records[0], first, "the first record is kept");
    assert_eq!(
        unique.duplicates,
        [results::Duplicate {
            key: first.key(),
            lines: vec![1, 3]
        }]
    );

    let written = report::write_dir(dir.path()).unwrap();
    assert_eq!(written.warnings.len(), 1, "{:?}", written.warnings);
    let w = &written.warnings[0];
    assert!(w.contains(&first.key()) && w.contains("lines 1, 3"), "{w}");
    let md = fs::read_to_string(dir.path().join("report/report.md")).unwrap();
    assert!(md.contains("lines 1, 3"), "the page does not flag it");
    assert!(
        md.contains("50.00") && !md.contains("90.00"),
        "not the first record:\n{md}"
    );

    // A store with each key once has nothing to flag.
    fs::remove_file(&store).unwrap();
    results::append(&store, &first).unwrap();
    assert!(report::write_dir(dir.path()).unwrap().warnings.is_empty());
}

/// Records what the arena reports with jobs at once: which job each slot runs, and checks
/// as it goes that events reach the slot of their job and that a finished job's record is
/// the last line of the store by then.
struct Slots {
    store: PathBuf,
    plan: Vec<Job>,
    at_once: usize,
    in_slot: BTreeMap<usize, Job>,
    events: usize,
    finished: Vec<String>,
    failed: Vec<String>,
}

impl Progress for Slots {
    fn start(&mut self, _total: usize, _done: usize, at_once: usize) {
        self.at_once = at_once;
    }
    fn job(&mut self, slot: usize, job: &Job) {
        assert!(slot < self.at_once, "slot {slot} of {}", self.at_once);
        let before = self.in_slot.insert(slot, job.clone());
        assert_eq!(before, None, "slot {slot} taken twice");
    }
    fn event(&mut self, slot: usize, event: &Event) {
        let job = &self.in_slot[&slot];
        let index = self.plan.iter().position(|j| j == job).unwrap();
        assert_eq!(
            event,
            &Event::Start { steps: index },
            "event of another job"
        );
        self.events += 1;
    }
    fn finished(&mut self, slot: usize, job: &Job, record: &Record) {
        assert_eq!(self.in_slot.remove(&slot).as_ref(), Some(job));
        let stored = results::load(&self.store).unwrap();
        assert_eq!(stored.last(), Some(record), "not stored at once");
        self.finished.push(job.label());
    }
    fn failed(&mut self, slot: usize, job: &Job, _error: &str) {
        assert_eq!(self.in_slot.remove(&slot).as_ref(), Some(job));
        self.failed.push(job.label());
    }
}

impl Slots {
    fn new(dir: &TempDir, opts: &Options) -> Slots {
        Slots {
            store: dir.store(),
            plan: runner::plan(opts),
            at_once: 0,
            in_slot: BTreeMap::new(),
            events: 0,
            finished: Vec::new(),
            failed: Vec::new(),
        }
    }
}

/// The jobs running now, and the most that ever ran at once.
#[derive(Default)]
struct Running {
    now: Mutex<Vec<Job>>,
    most: AtomicUsize,
}

impl Running {
    /// Marks `job` running for `ms` milliseconds; fails the job if a speed job ever ran
    /// beside another.
    fn hold(&self, job: &Job, ms: u64) -> Result<(), String> {
        let beside = {
            let mut now = self.now.lock().unwrap();
            now.push(job.clone());
            self.most.fetch_max(now.len(), SeqCst);
            now.len() > 1 && now.iter().any(Job::runs_alone)
        };
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let mut now = self.now.lock().unwrap();
        let beside = beside || (now.len() > 1 && now.iter().any(Job::runs_alone));
        now.retain(|j| j != job);
        if beside {
            return Err(format!("{} ran beside a speed job", job.label()));
        }
        Ok(())
    }
}

#[test]
fn jobs_run_at_once_each_with_its_share_of_threads_and_a_speed_job_alone() {
    let mut opts = options(&["listops", "text"], &["vanilla", "poolformer"], 1, 2);
    opts.suite.speed_lengths = vec![64, 128];
    let plan = runner::plan(&opts);
    assert_eq!(plan.len(), 4 + 4);
    let dir = TempDir::new("at-once");
    let running = Running::default();
    let threads = Mutex::new(Vec::new());
    let exec = |job: &Job, share: Option<usize>, events: &mut dyn FnMut(Event)| {
        threads.lock().unwrap().push((job.runs_alone(), share));
        let index = plan.iter().position(|j| j == job).unwrap();
        events(Event::Start { steps: index });
        running.hold(job, 60)?;
        Ok(stand_in(job, &opts))
    };
    let c = Concurrency {
        jobs: 2,
        threads: 2,
    };
    let mut progress = Slots::new(&dir, &opts);
    let out = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        c,
        &exec,
        &mut progress,
    )
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(out.ran, plan.len());
    assert_eq!(progress.at_once, 2);
    assert_eq!(progress.events, plan.len());
    assert_eq!(running.most.load(SeqCst), 2, "runs did not run at once");
    for (alone, share) in threads.into_inner().unwrap() {
        assert_eq!(share, if alone { None } else { Some(1) });
    }
    // Every record stored once, in the order the jobs finished.
    let stored = results::load(&dir.store()).unwrap();
    let labels: Vec<String> = stored
        .iter()
        .map(|r| {
            let job = plan.iter().find(|j| j.key(&opts) == r.key()).unwrap();
            job.label()
        })
        .collect();
    assert_eq!(labels, progress.finished);
    assert_eq!(keys(&stored), plan.iter().map(|j| j.key(&opts)).collect());
    // Speed jobs come last in the plan: they ran after every run, one at a time.
    let first_speed = labels.iter().position(|l| l.starts_with("speed")).unwrap();
    assert_eq!(first_speed, 4, "{labels:?}");
}

#[test]
fn with_jobs_at_once_a_failing_job_is_reported_and_the_others_go_on() {
    let mut opts = options(&["listops", "text"], &["vanilla", "poolformer"], 1, 2);
    opts.speed = false;
    let plan = runner::plan(&opts);
    let dir = TempDir::new("at-once-fail");
    let bad = plan[1].clone();
    let exec = |job: &Job, _: Option<usize>, events: &mut dyn FnMut(Event)| {
        let index = plan.iter().position(|j| j == job).unwrap();
        events(Event::Start { steps: index });
        std::thread::sleep(std::time::Duration::from_millis(20));
        if *job == bad {
            return Err("worker exited with signal 9 without a result".into());
        }
        Ok(stand_in(job, &opts))
    };
    let c = Concurrency {
        jobs: 3,
        threads: 2,
    };
    let mut progress = Slots::new(&dir, &opts);
    let out = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        c,
        &exec,
        &mut progress,
    )
    .unwrap();
    assert_eq!(progress.at_once, 3);
    assert_eq!(out.ran, 3);
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].0, bad);
    assert!(out.failed[0].1.contains("signal 9"));
    assert_eq!(progress.failed, [bad.label()]);
    assert_eq!(results::load(&dir.store()).unwrap().len(), 3);

    // The rerun runs the failed job only.
    let mut progress = Slots::new(&dir, &opts);
    let again = runner::run_arena(
        &opts,
        dir.path(),
        &Tasks::default(),
        c,
        &simple(|job: &Job| Ok(stand_in(job, &opts))),
        &mut progress,
    )
    .unwrap();
    assert_eq!((again.ran, again.already_done), (1, 3));
    assert_eq!(
        progress.at_once, 1,
        "one job left: it runs with all the threads"
    );
}

#[test]
fn with_jobs_at_once_a_panicking_job_stops_the_arena_without_hanging() {
    let mut opts = options(&["listops", "text"], &["vanilla", "poolformer"], 1, 2);
    opts.speed = false;
    let plan = runner::plan(&opts);
    let dir = TempDir::new("at-once-panic");
    let exec = simple(|job: &Job| {
        if *job == plan[0] {
            panic!("simulated crash of the arena");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        Ok(stand_in(job, &opts))
    });
    let c = Concurrency {
        jobs: 2,
        threads: 2,
    };
    let crashed = panic::catch_unwind(AssertUnwindSafe(|| {
        runner::run_arena(&opts, dir.path(), &Tasks::default(), c, &exec, &mut Quiet)
    }));
    assert!(crashed.is_err(), "the panic was swallowed");
    // Jobs beside it may have finished (the panic hook can take a while); the panicking
    // job stored nothing and the directory is free again.
    let stored = results::load(&dir.store()).unwrap_or_default();
    assert!(stored.len() < plan.len(), "{stored:?}");
    assert!(!keys(&stored).contains(&plan[0].key(&opts)));
    assert!(!dir.path().join(runner::LOCK_FILE).exists());
}

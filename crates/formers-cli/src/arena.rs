//! `formers arena`: the Long-Range-Arena-style benchmark — run it (each job in its own
//! worker process, so memory is measured per job), write task data, look at Pathfinder,
//! merge shards and write the report.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use formers_arena::exec::Work;
use formers_arena::pathfinder::{self, Pathfinder};
use formers_arena::plan;
use formers_arena::pool;
use formers_arena::report;
use formers_arena::results::{self, Record};
use formers_arena::runner::{
    self, Budget, Concurrency, Event, Job, Options, Outcome, Progress, Tasks,
};
use formers_arena::suite::{open_task, DataDirs, SuiteSpec, DATA_SEED, DEFAULT_TASKS, TASKS};
use formers_arena::task::{ArenaTask, Setting, Split};
use formers_arena::variants;
use formers_arena::worker::{self, WorkOrder};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Train every variant on every task with the same budget and report accuracy, speed and
/// memory side by side (LRA's Table 1, Table 2 and Figure 3). Without a subcommand, runs the
/// arena; `formers arena` alone runs the lite suite offline in minutes on 2 cores.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ArenaArgs {
    #[command(subcommand)]
    command: Option<ArenaCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum ArenaCommand {
    /// Write a task's examples in LRA's file layout (`Source<TAB>Target` for ListOps).
    Data(DataArgs),
    /// Write a PNG grid of Pathfinder (or Path-X) samples, framed green if connected.
    Show(ShowArgs),
    /// Join the results of arena directories (e.g. shards) into one directory and report it.
    Merge(MergeArgs),
    /// (Re)write the report of an arena directory from its results.
    Report(ReportArgs),
    /// Internal: run one job read from stdin, print progress as JSON lines; stops when
    /// stdin closes (the arena is gone).
    #[command(hide = true)]
    Worker,
}

/// Data sources shared by running and `data`.
#[derive(Debug, Args, Clone)]
struct DataFlags {
    /// LRA's ListOps files (`basic_{train,val,test}.tsv`); default: generated.
    #[arg(long, value_name = "DIR")]
    listops_dir: Option<PathBuf>,
    /// Text classification files (`train.tsv`, `test.tsv`: `label<TAB>text`, e.g. IMDb);
    /// default: passages of the shipped Shakespeare plays, labelled by play.
    #[arg(long, value_name = "DIR")]
    text_dir: Option<PathBuf>,
    /// LRA's AAN files (`new_aan_pairs.{train,eval,test}.tsv`); default: passage pairs of
    /// neighbouring passages of the shipped plays, labelled by whether they share text.
    #[arg(long, value_name = "DIR")]
    retrieval_dir: Option<PathBuf>,
    /// CIFAR-10 binary version (or set FORMERS_CIFAR10_DIR); the image task is skipped
    /// without it.
    #[arg(long, value_name = "DIR")]
    cifar_dir: Option<PathBuf>,
}

impl DataFlags {
    fn dirs(&self) -> DataDirs {
        DataDirs {
            listops: self.listops_dir.clone(),
            text: self.text_dir.clone(),
            retrieval: self.retrieval_dir.clone(),
            cifar: self.cifar_dir.clone(),
        }
    }
}

fn parse_setting(s: &str) -> Result<Setting, String> {
    Setting::parse(s).ok_or_else(|| format!("`{s}`: expected lite or full"))
}

#[derive(Debug, Args)]
struct RunArgs {
    /// `lite`: ≤256-token inputs, small splits and models (minutes on 2 cores); `full`:
    /// LRA's lengths and splits (for a GPU or days).
    #[arg(long, default_value = "lite", value_parser = parse_setting)]
    suite: Setting,
    /// Tasks, comma-separated: listops, text, retrieval, image, pathfinder, pathx.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_TASKS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    tasks: Vec<String>,
    /// Variants, comma-separated: names under configs/arena/ or paths to variant .json
    /// files; `all` for every shipped variant. Default: vanilla, local, linear-elu,
    /// performer, linformer (one per kind of token mixer; about 15 minutes on 2 cores).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Training per run: optimizer steps (`300`) or minutes (`2m`, `90s`), the same for
    /// every task. Default: the suite's steps per task, what each needs to learn (lite:
    /// listops 500, text 300, retrieval 300, pathfinder 1000, others 100; full: 5000).
    #[arg(long)]
    budget: Option<String>,
    /// Peak learning rate of every run [default: the suite's: 2e-3 lite, 5e-4 full].
    #[arg(long)]
    lr: Option<f64>,
    /// Seeds per (task, variant); tables show mean ± std.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Run only slice i of N (1-based), e.g. `--shard 2/4` on the second of four machines;
    /// join the directories with `formers arena merge`.
    #[arg(long, default_value = "1/1")]
    shard: String,
    /// Arena directory: results.jsonl, run directories, report/. Default: arena/<suite>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the speed and memory measurements (Table 2).
    #[arg(long)]
    no_speed: bool,
    // The help names this machine's default, so it is made at run time.
    #[arg(long, value_name = "N", value_parser = parse_jobs, help = jobs_help())]
    jobs: Option<usize>,
    /// Run jobs in this process, one at a time, instead of one worker process each (memory
    /// numbers then include earlier jobs).
    #[arg(long)]
    in_process: bool,
    #[command(flatten)]
    data: DataFlags,
}

/// The help of `--jobs`, with this machine's default.
fn jobs_help() -> String {
    format!(
        "Training jobs run at once, each in its own worker process with an equal share of \
         the compute threads (RAYON_NUM_THREADS, else the available cores; at least one \
         each). Default: the available cores ({}), since on 2 cores two single-threaded \
         workers trained the lite models at 1.4-1.6x the throughput of one two-threaded \
         worker. Speed jobs (Table 2) always run alone with all the threads: another job \
         beside them would corrupt their timing. With a steps budget a run's record does \
         not depend on N, apart from its speed and wall time, measured beside the other \
         jobs (a minutes budget turns time into steps, so its runs do). `--jobs 1`: one job \
         at a time with all the threads, as with --in-process",
        pool::available_cores()
    )
}

/// `--jobs`: a count of at least 1.
fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("at least one job must run at a time (e.g. --jobs 1)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a number of jobs, e.g. 2".into()),
    }
}

#[derive(Debug, Args)]
struct DataArgs {
    /// Task: listops, text, retrieval, image, pathfinder, pathx.
    task: String,
    #[arg(long, default_value = "train")]
    split: String,
    /// Examples to write (default: the whole split).
    #[arg(long)]
    n: Option<usize>,
    #[arg(long, default_value = "lite", value_parser = parse_setting)]
    suite: Setting,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    data: DataFlags,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// pathfinder or pathx.
    task: String,
    /// Image side: 12, 16, 32, 64 or 128 (default: the suite's).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value = "lite", value_parser = parse_setting)]
    suite: Setting,
    /// Samples in the grid.
    #[arg(long, default_value_t = 24)]
    n: usize,
    #[arg(long, default_value_t = 6)]
    cols: usize,
    #[arg(long, default_value = "train")]
    split: String,
    /// Output PNG.
    #[arg(long, default_value = "pathfinder.png")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct MergeArgs {
    /// Arena directories (or results.jsonl files) to join.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Directory to write the merged results and report to.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// Arena directory.
    dir: PathBuf,
}

pub fn run(a: ArenaArgs) -> Result<()> {
    match a.command {
        None => run_arena(a.run),
        Some(ArenaCommand::Data(d)) => data(d),
        Some(ArenaCommand::Show(s)) => show(s),
        Some(ArenaCommand::Merge(m)) => merge(m),
        Some(ArenaCommand::Report(r)) => {
            let path = write_report(&r.dir)?;
            println!("report: {}", path.display());
            Ok(())
        }
        Some(ArenaCommand::Worker) => worker::serve().map_err(|e| anyhow!(e)),
    }
}

fn parse_split(s: &str) -> Result<Split> {
    Split::parse(s).ok_or_else(|| anyhow!("split `{s}`: expected train, val or test"))
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow!("shard `{s}`: expected i/N with 1 ≤ i ≤ N, e.g. 2/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if i == 0 || n == 0 || i > n {
        return Err(bad());
    }
    Ok((i, n))
}

fn options(a: &RunArgs) -> Result<Options> {
    let mut suite = SuiteSpec::new(a.suite);
    if let Some(lr) = a.lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            bail!("--lr {lr}: expected a learning rate in (0, 1), e.g. 2e-3");
        }
        suite.lr = lr;
    }
    let (tasks, task_notes) = plan::dedup("--tasks", &a.tasks);
    let (variant_specs, variant_notes) = plan::dedup("--variants", &a.variants);
    for note in task_notes.iter().chain(&variant_notes) {
        eprintln!("note: {note}");
    }
    for t in &tasks {
        if !TASKS.contains(&t.as_str()) {
            bail!("unknown task `{t}`; expected some of {}", TASKS.join(", "));
        }
    }
    let variants = variants::chosen(&variant_specs).map_err(|e| anyhow!(e))?;
    let budget = match &a.budget {
        Some(b) => Budget::parse(b).map_err(|e| anyhow!(e))?,
        None => Budget::Suite,
    };
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    Ok(Options {
        suite,
        tasks,
        variants,
        budget,
        seeds: a.seeds,
        shard: parse_shard(&a.shard)?,
        speed: !a.no_speed,
        data: a.data.dirs(),
    })
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

/// One overall bar (jobs, ETA, jobs running) and one bar per job running at once. The
/// overall bar counts work, not jobs ([`formers_arena::exec::work`]: a speed job is a few
/// seconds, a run minutes), with partial credit for the steps of the jobs running, so its
/// ETA holds from the first steps on.
struct Bars {
    overall: ProgressBar,
    slots: Vec<JobView>,
    multi: MultiProgress,
    running: usize,
    /// A speed job runs (alone).
    alone: bool,
    /// Work of each planned job, by label.
    work: HashMap<String, Work>,
    /// Work of the jobs finished (or failed) so far.
    work_done: f64,
    /// Jobs of the shard, and how many are over.
    jobs_total: usize,
    jobs_done: usize,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(style(
            "arena   [{bar:30}] {prefix} jobs, {elapsed} elapsed (ETA {eta}) {msg}",
        ));
        // Redraw every second so elapsed time and ETA move during long runs.
        overall.enable_steady_tick(std::time::Duration::from_secs(1));
        Bars {
            overall,
            slots: Vec::new(),
            multi,
            running: 0,
            alone: false,
            work: HashMap::new(),
            work_done: 0.0,
            jobs_total: 0,
            jobs_done: 0,
        }
    }

    /// The overall bar's position: the work of the jobs over, plus each running job's
    /// share of its own work done.
    fn show_work(&self) {
        let running: f64 = self.slots.iter().map(|v| v.done.get()).sum();
        self.overall
            .set_position((self.work_done + running).round() as u64);
        self.overall
            .set_prefix(format!("{}/{}", self.jobs_done, self.jobs_total));
    }

    /// A line above the bars, or on stderr when they are hidden (not a terminal).
    fn say(&self, line: String) {
        if self.overall.is_hidden() {
            eprintln!("{line}");
        } else {
            self.overall.println(line);
        }
    }

    /// How many jobs run, on the overall bar.
    fn show_running(&self) {
        let at_once = self.slots.len();
        if self.alone {
            self.overall
                .set_message("| a speed job running alone".to_string());
        } else if at_once > 1 {
            self.overall
                .set_message(format!("| {} of up to {at_once} running", self.running));
        }
    }

    /// The job in `slot` is over: its bar waits for the next.
    fn ended(&mut self, slot: usize, job: &Job) {
        self.jobs_done += 1;
        self.work_done += self.work.get(&job.label()).map_or(0.0, |w| w.total);
        self.running = self.running.saturating_sub(1);
        self.alone = false;
        self.show_running();
        if let Some(view) = self.slots.get(slot) {
            view.idle();
        }
        self.show_work();
    }

    fn clear(&self) {
        for v in &self.slots {
            v.bar.finish_and_clear();
        }
        self.overall.finish();
    }
}

/// A running job's bar, drawn from its progress events; keeps the latest loss and
/// validation accuracy to show both.
struct JobView {
    bar: ProgressBar,
    loss: Cell<Option<f32>>,
    accuracy: Cell<Option<f64>>,
    /// The job's work ([`formers_arena::exec::work`]) and how much of it is done.
    work: Cell<Work>,
    done: Cell<f64>,
}

const NO_WORK: Work = Work {
    total: 0.0,
    training: 0.0,
};

impl JobView {
    fn new(bar: ProgressBar) -> Self {
        bar.set_style(style("{prefix:>28} [{bar:30}] {pos}/{len} {msg}"));
        JobView {
            bar,
            loss: Cell::new(None),
            accuracy: Cell::new(None),
            work: Cell::new(NO_WORK),
            done: Cell::new(0.0),
        }
    }

    fn idle(&self) {
        self.work.set(NO_WORK);
        self.done.set(0.0);
        self.bar.set_prefix("(idle)");
        self.bar.set_length(0);
        self.bar.set_position(0);
        self.bar.set_message("");
    }

    fn show_training(&self) {
        let loss = self.loss.get().map(|l| format!("loss {l:.4}"));
        let acc = self
            .accuracy
            .get()
            .map(|a| format!("val acc {:.1}%", a * 100.0));
        let parts: Vec<String> = loss.into_iter().chain(acc).collect();
        self.bar.set_message(parts.join(" | "));
    }

    fn event(&self, e: &Event) {
        match e {
            Event::Start { steps } => {
                self.bar.set_length(*steps as u64);
                self.bar.set_position(0);
                self.loss.set(None);
                self.accuracy.set(None);
                self.show_training();
            }
            Event::Step { step, loss } => {
                self.bar.set_position(*step as u64);
                let steps = self.bar.length().unwrap_or(0).max(1) as f64;
                let w = self.work.get();
                self.done.set(w.training * (*step as f64 / steps).min(1.0));
                self.loss.set(Some(*loss));
                self.show_training();
            }
            Event::Eval { accuracy, .. } => {
                self.accuracy.set(Some(*accuracy));
                self.show_training();
            }
            Event::Testing { done, total } => {
                let share = *done as f64 / (*total).max(1) as f64;
                let w = self.work.get();
                self.done
                    .set(w.training + (w.total - w.training) * share.min(1.0));
                self.bar.set_message(format!("testing {done}/{total}"))
            }
        }
    }
}

impl Progress for Bars {
    fn planned(&mut self, work: &[(Job, Work)]) {
        self.work = work.iter().map(|(j, w)| (j.label(), *w)).collect();
    }
    fn start(&mut self, total: usize, done: usize, at_once: usize) {
        self.jobs_total = total;
        self.jobs_done = done;
        self.work_done = 0.0;
        let all: f64 = self.work.values().map(|w| w.total).sum();
        self.overall.set_length(all.round().max(1.0) as u64);
        self.overall.reset_eta();
        self.slots = (0..at_once)
            .map(|_| JobView::new(self.multi.add(ProgressBar::new(0))))
            .collect();
        self.show_work();
        if done > 0 {
            self.say(format!("{done} of {total} jobs already done: not rerun"));
        }
        if at_once > 1 {
            self.say(format!(
                "{at_once} jobs at a time, each with its share of the threads; speed jobs alone"
            ));
        }
    }
    fn skipped(&mut self, task: &str, reason: &str) {
        self.say(format!("skipping task `{task}`: {reason}"));
    }
    fn job(&mut self, slot: usize, job: &Job) {
        self.running += 1;
        self.alone = job.runs_alone() && self.slots.len() > 1;
        self.show_running();
        if let Some(view) = self.slots.get(slot) {
            view.bar.set_prefix(job.label());
            view.work
                .set(self.work.get(&job.label()).copied().unwrap_or(NO_WORK));
            view.done.set(0.0);
        }
    }
    fn event(&mut self, slot: usize, event: &Event) {
        if let Some(view) = self.slots.get(slot) {
            view.event(event);
        }
        self.show_work();
    }
    fn finished(&mut self, slot: usize, job: &Job, record: &Record) {
        self.ended(slot, job);
        let line = match record {
            Record::Run(r) => format!(
                "{:<10} {:<12} seed {}: test accuracy {:.2}% ({} steps, {:.1} steps/s on {} \
                 thread{}, {}, {:.0} s)",
                r.task,
                r.variant,
                r.seed,
                r.test_accuracy * 100.0,
                r.steps,
                r.train_steps_per_s,
                r.threads,
                if r.threads == 1 { "" } else { "s" },
                formers_arena::mem::human(r.peak_rss_bytes),
                r.wall_s
            ),
            Record::Speed(s) => format!(
                "speed      {:<12} length {}: {:.2} steps/s, {}",
                s.variant,
                s.length,
                s.steps_per_s,
                formers_arena::mem::human(s.peak_rss_bytes)
            ),
            Record::Skipped(_) => return,
        };
        self.say(line);
    }
    fn failed(&mut self, slot: usize, job: &Job, error: &str) {
        self.ended(slot, job);
        self.say(format!("FAILED {}: {error}", job.label()));
    }
}

fn run_arena(a: RunArgs) -> Result<()> {
    let opts = options(&a)?;
    let jobs = match (a.jobs, a.in_process) {
        (Some(n), true) if n > 1 => {
            bail!("--in-process runs one job at a time; use --jobs 1 or drop --in-process")
        }
        (_, true) => 1,
        (Some(n), false) => n,
        (None, false) => pool::available_cores(),
    };
    let concurrency = Concurrency::new(jobs).map_err(|e| anyhow!(e))?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| Path::new("arena").join(opts.suite.setting.name()));
    let started = Instant::now();
    let mut bars = Bars::new();
    let work = out.join("runs");
    let tasks = Tasks::default();
    let outcome: Outcome = if a.in_process {
        runner::run_arena(
            &opts,
            &out,
            &tasks,
            concurrency,
            &|job, _threads, events| runner::run_job(job, &opts, &tasks, &work, events),
            &mut bars,
        )
    } else {
        runner::run_arena(
            &opts,
            &out,
            &tasks,
            concurrency,
            &|job, threads, events| run_worker(job, &opts, &work, threads, events),
            &mut bars,
        )
    }
    .map_err(|e| anyhow!(e))?;
    bars.clear();
    let report = write_report(&out)?;
    eprintln!(
        "{} jobs run now, {} found done, {} failed, in {:.1} minutes",
        outcome.ran,
        outcome.already_done,
        outcome.failed.len(),
        started.elapsed().as_secs_f64() / 60.0
    );
    println!("report: {}", report.display());
    if !outcome.failed.is_empty() {
        bail!(
            "{} job(s) failed: {}; rerun the same command to retry them",
            outcome.failed.len(),
            outcome
                .failed
                .iter()
                .map(|(j, _)| j.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Runs `job` in a fresh `formers arena worker` process with `threads` compute threads
/// (`None`: this process's own) and follows its progress.
fn run_worker(
    job: &Job,
    opts: &Options,
    work: &Path,
    threads: Option<usize>,
    events: &mut dyn FnMut(Event),
) -> Result<Record, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the formers binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["arena", "worker"]);
    if let Some(n) = threads {
        // candle and formers' kernels size their thread pools from this variable.
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let order = WorkOrder {
        opts: opts.clone(),
        job: job.clone(),
        work: work.to_path_buf(),
    };
    worker::run(cmd, &order, &mut |e| events(e.clone()))
}

/// Writes `dir/report/` from `dir`'s results, warning of keys stored twice; returns the HTML
/// page's path.
fn write_report(dir: &Path) -> Result<PathBuf> {
    let written = report::write_dir(dir).map_err(|e| anyhow!(e))?;
    for w in &written.warnings {
        eprintln!("warning: {w}");
    }
    Ok(written.index)
}

fn merge(m: MergeArgs) -> Result<()> {
    let records = results::merge(&m.dirs).map_err(|e| anyhow!(e))?;
    fs::create_dir_all(&m.out).with_context(|| format!("creating {}", m.out.display()))?;
    let store = m.out.join(results::FILE);
    if store.exists() {
        bail!("{} exists; merge into a new directory", store.display());
    }
    for r in &records {
        results::append(&store, r).map_err(|e| anyhow!(e))?;
    }
    if let Some(mut opts) = m.dirs.iter().find_map(|d| runner::load_options(d)) {
        opts.shard = (1, 1);
        runner::save_options(&opts, &m.out).map_err(|e| anyhow!(e))?;
    }
    eprintln!(
        "{} records from {} directories",
        records.len(),
        m.dirs.len()
    );
    let report = write_report(&m.out)?;
    println!("report: {}", report.display());
    Ok(())
}

fn data(d: DataArgs) -> Result<()> {
    let split = parse_split(&d.split)?;
    let task = open_task(&d.task, d.suite, &d.data.dirs()).map_err(|e| anyhow!(e))?;
    let n = d.n.unwrap_or(task.len(split)).min(task.len(split));
    let file = fs::File::create(&d.out).with_context(|| format!("creating {}", d.out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let pb = ProgressBar::new_spinner();
    pb.set_message(format!("writing {n} examples"));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    task.write_tsv(split, n, &mut w)
        .and_then(|_| w.flush())
        .with_context(|| format!("writing {}", d.out.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "wrote {n} {} examples of `{}` ({}) to {}",
        split.name(),
        task.name(),
        task.source(),
        d.out.display()
    );
    Ok(())
}

fn show(s: ShowArgs) -> Result<()> {
    const SHOWN: &[&str] = &["pathfinder", "pathx"];
    if !SHOWN.contains(&s.task.as_str()) {
        bail!(
            "`arena show` cannot draw task `{}`; expected one of {}",
            s.task,
            SHOWN.join(", ")
        );
    }
    let split = parse_split(&s.split)?;
    let pf = match s.size {
        Some(size) => Pathfinder::new(s.suite, DATA_SEED, size),
        None => Pathfinder::for_task(&s.task, s.suite, DATA_SEED),
    }
    .map_err(|e| anyhow!(e))?;
    let n = s.n.min(pf.len(split)).max(1);
    let images: Vec<(Vec<u8>, u32)> = (0..n)
        .map(|i| {
            let ex = pf.example(split, i);
            (ex.ids.iter().map(|&p| p as u8).collect(), ex.label)
        })
        .collect();
    pathfinder::write_grid_png(&s.out, &images, pf.size(), s.cols.max(1))
        .with_context(|| format!("writing {}", s.out.display()))?;
    let connected = images.iter().filter(|(_, l)| *l == 1).count();
    println!(
        "{}: {n} {}×{} samples ({connected} connected, framed green; {} not, red)",
        s.out.display(),
        pf.size(),
        pf.size(),
        n - connected
    );
    Ok(())
}

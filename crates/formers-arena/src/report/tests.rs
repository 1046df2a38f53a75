use super::*;
use crate::results::{RunResult, Skipped, SpeedResult};

fn run(task: &str, variant: &str, seed: u64, acc: f64) -> Record {
    Record::Run(RunResult {
        suite: "lite".into(),
        task: task.into(),
        variant: variant.into(),
        seed,
        budget: "300".into(),
        source: "generated".into(),
        seq_len: 512,
        batch_size: 8,
        steps: 300,
        test_accuracy: acc,
        test_examples: 1000,
        majority_accuracy: None,
        val_accuracy: acc,
        train_steps_per_s: if variant == "vanilla" { 2.0 } else { 3.0 },
        threads: 2,
        infer_tokens_per_s: 12345.0,
        peak_rss_bytes: 200 << 20,
        params: 123_456,
        flops_per_token: 2.5e6,
        wall_s: 150.0,
        loss_curve: (0..50)
            .map(|s| (s, 2.0 / (1.0 + s as f32) + seed as f32 * 0.01))
            .collect(),
    })
}

fn speed(variant: &str, length: usize, steps: f64, mib: u64) -> Record {
    Record::Speed(SpeedResult {
        suite: "lite".into(),
        variant: variant.into(),
        length,
        batch_size: 4,
        steps_per_s: steps,
        peak_rss_bytes: mib << 20,
        params: 1000,
    })
}

fn skipped(task: &str, reason: &str) -> Record {
    Record::Skipped(Skipped {
        suite: "lite".into(),
        task: task.into(),
        reason: reason.into(),
    })
}

fn meta() -> ReportMeta {
    ReportMeta {
        title: "formers arena — test <suite>".into(),
        notes: vec!["suite: lite".into(), "budget: 300 steps & more".into()],
        variant_order: vec!["vanilla".into(), "performer".into(), "local".into()],
    }
}

fn sample() -> Vec<Record> {
    let mut r = vec![];
    for (i, v) in ["vanilla", "performer", "local", "zeta"].iter().enumerate() {
        for seed in 0..2 {
            r.push(run(
                "listops",
                v,
                seed,
                0.3 + 0.01 * i as f64 + 0.003 * seed as f64,
            ));
            r.push(run(
                "text",
                v,
                seed,
                0.6 + 0.02 * i as f64 - 0.001 * seed as f64,
            ));
        }
    }
    r.push(run("pathfinder", "vanilla", 0, 0.7));
    r.push(skipped("image", "CIFAR-10 files absent"));
    for (v, f) in [("vanilla", 1.0), ("performer", 1.7), ("local", 1.3)] {
        for len in [256, 1024] {
            r.push(speed(
                v,
                len,
                4.0 * f * 256.0 / len as f64,
                100 + (len as u64) / (f as u64),
            ));
        }
    }
    r
}

/// A deterministic permutation (no rand dependency).
fn shuffled(mut v: Vec<Record>, seed: u64) -> Vec<Record> {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, (s >> 33) as usize % (i + 1));
    }
    v
}

#[test]
fn table1_is_independent_of_record_order() {
    let recs = sample();
    let want = table1_markdown(&recs, &meta());
    for seed in 1..6 {
        let got = table1_markdown(&shuffled(recs.clone(), seed), &meta());
        assert_eq!(got, want);
    }
    let mut rev = recs.clone();
    rev.reverse();
    assert_eq!(table1_markdown(&rev, &meta()), want);
    // A record merged twice (overlapping shards) counts once.
    let mut dup = recs.clone();
    dup.extend(recs.iter().take(5).cloned());
    assert_eq!(table1_markdown(&dup, &meta()), want);
    assert_eq!(
        table2_markdown(&dup, &meta()),
        table2_markdown(&recs, &meta())
    );
    assert_eq!(
        details_markdown(&dup, &meta()),
        details_markdown(&recs, &meta())
    );
}

#[test]
fn table1_layout_rows_columns_and_notes() {
    let md = table1_markdown(&sample(), &meta());
    let header = md.lines().find(|l| l.starts_with("| Variant")).unwrap();
    assert_eq!(
        header,
        "| Variant | ListOps | Text | Image | Pathfinder | Avg |"
    );
    let rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| Variant"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap().trim())
        .collect();
    // listops has 10 classes and pathfinder 2; the text task's class count depends on its files.
    assert_eq!(rows, ["vanilla", "performer", "local", "zeta", "chance"]);
    assert!(
        md.contains("| chance | 10.00 (1/10) | — | — | 50.00 (1/2) |  |"),
        "{md}"
    );
    assert!(md.contains("Image skipped: CIFAR-10 files absent"));
    assert!(md.contains("| skipped |"));
    // performer has 2 of the 3 tasks that ran.
    assert!(md.contains("(2/3)"));
    assert!(md.contains("LRA paper (Tay et al. 2021, Table 1, full setting"));
    assert!(md.contains(
        "| Transformer | vanilla | 36.37 | 64.27 | 57.46 | 42.44 | 71.40 | FAIL | 54.39 |"
    ));
    assert!(md.contains(
        "| Performer | performer | 18.01 | 65.40 | 53.82 | 42.77 | 77.05 | FAIL | 51.41 |"
    ));
}

#[test]
fn mean_and_std_over_two_seeds() {
    let recs = vec![
        run("listops", "vanilla", 0, 0.60),
        run("listops", "vanilla", 1, 0.70),
    ];
    let md = table1_markdown(&recs, &meta());
    // mean 65.00, sample std sqrt(((−5)² + 5²) / 1) = 7.07
    assert!(md.contains("| vanilla | 65.00 ± 7.07 | 65.00 |"), "{md}");
    let one = table1_markdown(&recs[..1], &meta());
    assert!(one.contains("| vanilla | 60.00 | 60.00 |"), "{one}");
}

#[test]
fn relative_speed_and_memory() {
    let recs = vec![
        speed("vanilla", 1024, 2.0, 1000),
        speed("performer", 1024, 3.4, 450),
        speed("vanilla", 2048, 1.0, 2000),
        speed("performer", 2048, 3.0, 500),
        speed("local", 4096, 5.0, 300),
    ];
    let md = table2_markdown(&recs, &meta());
    let head = md.lines().find(|l| l.starts_with("| Variant")).unwrap();
    assert!(head.contains("Steps per second · 1K") && head.contains("Peak memory · 4K"));
    assert!(
        md.contains("| vanilla | 2.00 | 1.00 | — | 1000 MiB | 2000 MiB | — |"),
        "{md}"
    );
    assert!(
        md.contains("| performer | 1.70× | 3.00× | — | 0.45× | 0.25× | — |"),
        "{md}"
    );
    assert!(
        md.contains("| local | — | — | 5.00 (abs) | — | — | 300 MiB |"),
        "{md}"
    );
    assert!(md.contains("No `vanilla` measurement at length 4K"));
    assert!(md.contains("| Linformer | linformer | 9.3 (1.2×) | 9.1 (1.9×) | 8.5 (3.7×) | 7.7 (5.5×) | 0.37 | 0.55 | 0.99 | 0.99 |"), "{md}");
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("formers-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn write_report_is_self_contained() {
    let dir = tmp_dir("full");
    let index = write_report(&sample(), &meta(), &dir).unwrap();
    assert_eq!(index, dir.join("index.html"));
    let html = std::fs::read_to_string(&index).unwrap();
    for bad in ["src=\"http", "<link", "@import", "url(", "<script", "<img"] {
        assert!(!html.contains(bad), "{bad}");
    }
    assert!(!html.contains("http"), "no http at all in this page");
    assert!(html.contains("<svg"));
    assert!(html.contains("formers arena — test &lt;suite&gt;"));
    assert!(html.contains("budget: 300 steps &amp; more"));
    for caption in [
        "formers — test accuracy (%)",
        "LRA paper (Tay et al. 2021, Table 1",
        "formers — training speed and peak memory",
        "LRA paper (Tay et al. 2021, Table 2",
        "Per task and variant",
    ] {
        assert!(
            html.contains(&format!("<caption>{}", html_escape(caption))),
            "{caption}"
        );
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let svgs = [
        "accuracy_vs_speed.svg",
        "loss_listops.svg",
        "loss_text.svg",
        "loss_pathfinder.svg",
        "speed_vs_length.svg",
        "memory_vs_length.svg",
    ];
    for f in svgs {
        let svg = std::fs::read_to_string(dir.join(f)).unwrap();
        let head = svg.trim_start();
        assert!(head.starts_with("<svg") || head.starts_with("<?xml"), "{f}");
        assert!(svg.trim_end().ends_with("</svg>"), "{f}");
        assert!(md.contains(&format!("]({f})")), "{f}");
    }
    assert_eq!(html.matches("<svg").count(), svgs.len());
    assert!(!dir.join("loss_image.svg").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn degenerate_inputs_do_not_panic() {
    let nan = {
        let mut r = run("listops", "vanilla", 0, f64::NAN);
        if let Record::Run(x) = &mut r {
            x.train_steps_per_s = f64::NAN;
            x.loss_curve = vec![(0, f32::NAN), (1, f32::INFINITY)];
        }
        r
    };
    let cases: Vec<(&str, Vec<Record>)> = vec![
        ("empty", vec![]),
        (
            "skipped",
            vec![skipped("pathx", "too long"), skipped("pathx", "no data")],
        ),
        ("single", vec![run("text", "performer", 0, 0.5)]),
        (
            "one-point",
            vec![
                speed("vanilla", 1024, 1.0, 10),
                run("text", "vanilla", 0, 0.5),
            ],
        ),
        (
            "zero",
            vec![speed("vanilla", 1024, 0.0, 0), speed("local", 1024, 0.0, 0)],
        ),
        ("nan", vec![nan, speed("vanilla", 512, f64::NAN, 0)]),
    ];
    for (name, recs) in cases {
        let m = ReportMeta::default();
        let _ = table1_markdown(&recs, &m);
        let _ = table2_markdown(&recs, &m);
        let _ = details_markdown(&recs, &m);
        let dir = tmp_dir(name);
        let index = write_report(&recs, &m, &dir).unwrap();
        let html = std::fs::read_to_string(index).unwrap();
        assert!(html.contains("</html>"), "{name}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let md = table1_markdown(&[skipped("pathx", "b"), skipped("pathx", "a")], &meta());
    assert!(md.contains("Path-X skipped: a; b"), "{md}");
    assert!(charts(&[], &meta()).is_empty());
}

#[test]
fn the_details_table_says_how_many_threads_each_run_had() {
    let mut recs = sample();
    let md = details_markdown(&recs, &meta());
    assert!(md.contains("each run on 2 compute thread(s)"), "{md}");
    // Runs trained beside another job (one thread each) and records from before the field.
    for (i, r) in recs.iter_mut().enumerate() {
        if let Record::Run(r) = r {
            r.threads = [1, 2, 0][i % 3];
        }
    }
    let md = details_markdown(&recs, &meta());
    assert!(md.contains("each run on 1 or 2 compute thread(s)"), "{md}");
    for r in recs.iter_mut() {
        if let Record::Run(r) = r {
            r.threads = 0;
        }
    }
    assert!(!details_markdown(&recs, &meta()).contains("compute thread"));
}

fn with_majority(mut r: Record, majority: f64) -> Record {
    if let Record::Run(x) = &mut r {
        x.majority_accuracy = Some(majority);
    }
    r
}

#[test]
fn a_task_at_chance_is_marked_and_left_out_of_the_average() {
    // text: majority class 50%, 1000 test examples: at chance up to 50 + 2·1.58 = 53.16%.
    let recs = vec![
        with_majority(run("text", "vanilla", 0, 0.52), 0.5),
        with_majority(run("text", "local", 0, 0.50), 0.5),
        with_majority(run("retrieval", "vanilla", 0, 0.80), 0.5),
        with_majority(run("retrieval", "local", 0, 0.53), 0.5),
    ];
    let md = table1_markdown(&recs, &meta());
    assert!(
        md.contains("| vanilla | 52.00 (at chance) | 80.00 | 80.00 |"),
        "{md}"
    );
    assert!(
        md.contains("| local | 50.00 (at chance) | 53.00 (at chance) | 53.00 |"),
        "{md}"
    );
    assert!(
        md.contains("| chance | 50.00 (majority) | 50.00 (majority) |  |"),
        "{md}"
    );
    assert!(md.contains("Left out of Avg: Text"), "{md}");
    let verdict = verdict_markdown(&recs, &meta());
    assert!(
        verdict.contains("Text: every variant is at chance (majority class 50.0%)"),
        "{verdict}"
    );
    assert!(verdict.contains("At chance, left out: local."), "{verdict}");
    // Nothing learned anywhere: no average at all, and the note says why.
    let md = table1_markdown(&recs[..2], &meta());
    assert!(md.contains("| vanilla | 52.00 (at chance) | — |"), "{md}");
    assert!(
        md.contains("Avg: none. No variant beat chance on any task (Text)"),
        "{md}"
    );
    // Without a majority rate or a fixed class count (text), nothing is marked.
    let md = table1_markdown(&[run("text", "vanilla", 0, 0.5)], &meta());
    assert!(
        !md.contains("(at chance)") && !md.contains("| chance |"),
        "{md}"
    );
}

#[test]
fn the_report_opens_with_the_verdict_and_says_what_seeds_mean() {
    let dir = tmp_dir("verdict");
    let recs = sample();
    write_report(&recs, &meta(), &dir).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let verdict = md.find("## Verdict").unwrap();
    assert!(verdict < md.find("## Setup").unwrap());
    assert!(verdict < md.find("## Accuracy").unwrap());
    // Two seeds: intervals, and no one-seed caveat.
    assert!(!md.contains("a single seed cannot separate"), "{md}");
    // ListOps (512 tokens) uses the speed jobs at 256, the nearest measured length.
    assert!(
        md.contains("- ListOps (512 tokens; speed jobs at 256 + in-run figures): front:"),
        "{md}"
    );
    // zeta has no speed job: in-run figures, said so.
    assert!(md.contains("in-run figures"), "{md}");
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.find("Verdict").unwrap() < html.find("<caption>").unwrap());
    let details = details_markdown(&recs, &meta());
    assert!(details.contains("| 2 (seeds 0, 1) |"), "{details}");
    assert!(details.contains("Seeds: how many seeds"), "{details}");
    let one: Vec<Record> = recs
        .into_iter()
        .filter(|r| !matches!(r, Record::Run(x) if x.seed == 1))
        .collect();
    assert!(details_markdown(&one, &meta()).contains("| 1 (seed 0) |"));
    assert!(
        verdict_markdown(&one, &meta()).contains("a single seed cannot separate close variants")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_speed_figure_comes_from_the_speed_jobs_at_the_nearest_length() {
    let m = meta();
    let mut recs = vec![run("text", "vanilla", 0, 0.7), run("text", "local", 0, 0.8)];
    // In-run: local 3.0 vs vanilla 2.0 steps/s = 1.50×.
    let v = verdict_markdown(&recs, &m);
    assert!(v.contains("(512 tokens; in-run figures)"), "{v}");
    assert!(
        v.contains("Chance unknown (no majority-class rate recorded)"),
        "{v}"
    );
    assert!(v.contains("local (80.0%, 1.50× speed, 200 MiB)"), "{v}");
    let chart = charts(&recs, &m).into_iter().next().unwrap();
    assert!(
        chart.note.contains("(in-run, no speed jobs)"),
        "{}",
        chart.note
    );
    // Speed jobs at 256 and 1024: 512 is nearer 256, where local is 1.25× vanilla.
    recs.extend([
        speed("vanilla", 256, 4.0, 100),
        speed("local", 256, 5.0, 90),
        speed("vanilla", 1024, 1.0, 400),
        speed("local", 1024, 2.0, 200),
    ]);
    let v = verdict_markdown(&recs, &m);
    assert!(v.contains("(512 tokens; speed jobs at 256)"), "{v}");
    assert!(v.contains("local (80.0%, 1.25× speed, 90 MiB)"), "{v}");
    assert!(v.contains("front: local"), "{v}");
    assert!(v.contains("vanilla (behind local)"), "{v}");
    let chart = charts(&recs, &m).into_iter().next().unwrap();
    assert_eq!(chart.file, "accuracy_vs_speed.svg");
    assert!(
        chart.note.contains("speed jobs at 256 tokens"),
        "{}",
        chart.note
    );
    assert!(chart.svg.contains("local (90 MiB)"), "{}", chart.svg);
}

/// The x of each `<text>` element whose content is `label`.
fn text_x(svg: &str, label: &str) -> Vec<i32> {
    svg.split("<text ")
        .skip(1)
        .filter(|t| {
            t.split_once('>').is_some_and(|(_, rest)| {
                rest.trim_start().starts_with(&format!("{label}\n"))
                    || rest.trim_start().starts_with(&format!("{label}<"))
            })
        })
        .filter_map(|t| t.strip_prefix("x=\"")?.split('"').next()?.parse().ok())
        .collect()
}

#[test]
fn the_loss_legend_sits_beside_the_plot_and_a_smoothed_curve_is_drawn() {
    let charts = charts(&sample(), &meta());
    let loss = charts
        .iter()
        .find(|c| c.file == "loss_listops.svg")
        .unwrap();
    for v in ["vanilla", "performer", "local", "zeta"] {
        let xs = text_x(&loss.svg, v);
        assert_eq!(xs.len(), 1, "{v}: {xs:?}");
        // The plot ends at 860 − 150 px; the legend panel starts there.
        assert!(xs[0] >= 710, "{v} legend at x = {}", xs[0]);
    }
    // 50 logged points: a 3-point window, said in the caption; raw curves drawn faint.
    assert!(
        loss.note
            .contains("moving average of the training loss over 3"),
        "{}",
        loss.note
    );
    assert!(loss.svg.contains("opacity=\"0.25\""));
}

//! The whole report as one Markdown file and one self-contained HTML page.

use super::charts::Chart;
use super::table::{html_escape, md_escape, Table};
use super::ReportMeta;

/// Everything the page shows.
pub struct Document<'a> {
    pub meta: &'a ReportMeta,
    /// The verdict's sentences, shown first.
    pub verdict: &'a [String],
    pub table1: &'a [Table],
    pub table2: &'a [Table],
    pub details: &'a [Table],
    pub charts: &'a [Chart],
}

const H_VERDICT: &str = "Verdict: which variant to pick";
const H_SETUP: &str = "Setup";
const H_ACCURACY: &str = "Accuracy (LRA Table 1 layout)";
const H_SPEED: &str = "Speed and memory (LRA Table 2 layout)";
const H_DETAILS: &str = "Details";
const H_CHARTS: &str = "Charts";
const CITATION: &str = "Layout after Tay et al., \"Long Range Arena: A Benchmark for Efficient \
                        Transformers\", ICLR 2021. Paper numbers are quoted for reference only.";

const NO_VERDICT: &str = "Nothing to judge yet: no finished runs or speed measurements.";

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;\
max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
table{border-collapse:collapse;margin:1em 0 .4em;font-size:.92em}\
caption{text-align:left;font-weight:600;padding:.3em 0}\
th,td{border:1px solid #ccc;padding:.25em .6em;white-space:nowrap}\
th{background:#f3f3f3}th.group{text-align:center}td.num,th.num{text-align:right;\
font-variant-numeric:tabular-nums}ul.notes{font-size:.85em;color:#555;margin-top:0}\
figure{margin:1.5em 0}figcaption{font-size:.9em;color:#555}\
.svg svg{max-width:100%;height:auto}.cite{color:#666;font-size:.85em}";

impl Document<'_> {
    /// `report.md`: title, notes, tables, charts as image links.
    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", md_escape(&self.meta.title));
        s.push_str(&format!("_{CITATION}_\n\n"));
        s.push_str(&format!("## {H_VERDICT}\n\n"));
        if self.verdict.is_empty() {
            s.push_str(&format!("{NO_VERDICT}\n"));
        }
        for l in self.verdict {
            s.push_str(&format!("- {}\n", md_escape(l)));
        }
        if !self.meta.notes.is_empty() {
            s.push_str(&format!("\n## {H_SETUP}\n\n"));
        }
        for n in &self.meta.notes {
            s.push_str(&format!("- {}\n", md_escape(n)));
        }
        for (heading, tables) in self.sections() {
            s.push_str(&format!("\n## {heading}\n\n"));
            for t in tables {
                s.push_str(&t.to_markdown());
                s.push('\n');
            }
        }
        s.push_str(&format!("\n## {H_CHARTS}\n\n"));
        if self.charts.is_empty() {
            s.push_str("No chart has data.\n");
        }
        for c in self.charts {
            s.push_str(&format!(
                "![{}]({})\n\n_{}_\n\n",
                md_escape(&c.title),
                c.file,
                md_escape(&c.note)
            ));
        }
        s
    }

    /// `index.html`: one page, inline style and inline SVG, nothing fetched.
    pub fn html(&self) -> String {
        let title = html_escape(&self.meta.title);
        let mut s = format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
             <p class=\"cite\">{}</p>\n",
            html_escape(CITATION)
        );
        s.push_str(&format!("<h2>{}</h2>\n", html_escape(H_VERDICT)));
        if self.verdict.is_empty() {
            s.push_str(&format!("<p>{}</p>\n", html_escape(NO_VERDICT)));
        } else {
            s.push_str("<ul class=\"verdict\">\n");
            for l in self.verdict {
                s.push_str(&format!("<li>{}</li>\n", html_escape(l)));
            }
            s.push_str("</ul>\n");
        }
        if !self.meta.notes.is_empty() {
            s.push_str(&format!("<h2>{H_SETUP}</h2>\n<ul>\n"));
            for n in &self.meta.notes {
                s.push_str(&format!("<li>{}</li>\n", html_escape(n)));
            }
            s.push_str("</ul>\n");
        }
        for (heading, tables) in self.sections() {
            s.push_str(&format!("<h2>{}</h2>\n", html_escape(heading)));
            for t in tables {
                s.push_str(&t.to_html());
            }
        }
        s.push_str(&format!("<h2>{H_CHARTS}</h2>\n"));
        if self.charts.is_empty() {
            s.push_str("<p>No chart has data.</p>\n");
        }
        for c in self.charts {
            s.push_str(&format!(
                "<figure>\n<div class=\"svg\">{}</div>\n<figcaption>{} ({}). {}</figcaption>\n</figure>\n",
                inline_svg(&c.svg),
                html_escape(&c.title),
                html_escape(&c.file),
                html_escape(&c.note)
            ));
        }
        s.push_str("</body>\n</html>\n");
        s
    }

    fn sections(&self) -> [(&'static str, &[Table]); 3] {
        [
            (H_ACCURACY, self.table1),
            (H_SPEED, self.table2),
            (H_DETAILS, self.details),
        ]
    }
}

/// An SVG document ready to inline in HTML: no XML prolog, no namespace URL (HTML5 does not need
/// it), and a `viewBox` so CSS can scale it.
pub fn inline_svg(svg: &str) -> String {
    let body = match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => return String::new(),
    };
    let body = body.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1);
    match (attr(&body, "width"), attr(&body, "height")) {
        (Some(w), Some(h)) if !body.contains("viewBox") => {
            body.replacen("<svg", &format!("<svg viewBox=\"0 0 {w} {h}\""), 1)
        }
        _ => body,
    }
}

/// The value of an attribute of the first tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let head = &tag[..tag.find('>')?];
    let start = head.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = head[start..].find('"')?;
    Some(head[start..start + len].to_string())
}

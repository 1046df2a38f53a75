//! A small table that renders to both Markdown and HTML.

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A titled table with an optional grouped header row and footnotes.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub title: String,
    /// Column groups spanning the header, e.g. ("Steps per second", 4); empty for none.
    pub groups: Vec<(String, usize)>,
    pub header: Vec<String>,
    pub align: Vec<Align>,
    pub rows: Vec<Vec<String>>,
    pub footnotes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: Vec<String>) -> Self {
        let align = (0..header.len())
            .map(|i| if i == 0 { Align::Left } else { Align::Right })
            .collect();
        Table {
            title: title.into(),
            header,
            align,
            ..Table::default()
        }
    }

    pub fn push_row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// The group title of each column ("" where none), for folding into Markdown headers.
    fn column_groups(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.header.len());
        for (name, span) in &self.groups {
            out.extend(std::iter::repeat_n(name.clone(), *span));
        }
        out.resize(self.header.len(), String::new());
        out
    }

    /// GitHub-flavoured Markdown: bold title line, table, footnotes as a list.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        if !self.title.is_empty() {
            s.push_str(&format!("**{}**\n\n", md_escape(&self.title)));
        }
        let groups = self.column_groups();
        let head: Vec<String> = self
            .header
            .iter()
            .zip(&groups)
            .map(|(h, g)| match g.is_empty() {
                true => md_cell(h),
                false => format!("{} · {}", md_cell(g), md_cell(h)),
            })
            .collect();
        s.push_str(&md_row(&head));
        let rule: Vec<String> = self
            .align
            .iter()
            .map(|a| match a {
                Align::Left => ":---".to_string(),
                Align::Right => "---:".to_string(),
            })
            .collect();
        s.push_str(&md_row(&rule));
        for row in &self.rows {
            let cells: Vec<String> = self.pad(row).iter().map(|c| md_cell(c)).collect();
            s.push_str(&md_row(&cells));
        }
        if !self.footnotes.is_empty() {
            s.push('\n');
            for f in &self.footnotes {
                s.push_str(&format!("- {}\n", md_escape(f)));
            }
        }
        s
    }

    /// An HTML `<table>` with a `<caption>` and footnotes below it.
    pub fn to_html(&self) -> String {
        let mut s = String::from("<table>\n");
        if !self.title.is_empty() {
            s.push_str(&format!(
                "<caption>{}</caption>\n",
                html_escape(&self.title)
            ));
        }
        s.push_str("<thead>\n");
        if !self.groups.is_empty() {
            s.push_str(&self.html_group_row());
        }
        s.push_str("<tr>");
        for (i, h) in self.header.iter().enumerate() {
            s.push_str(&format!("<th{}>{}</th>", self.class(i), html_escape(h)));
        }
        s.push_str("</tr>\n</thead>\n<tbody>\n");
        for row in &self.rows {
            s.push_str("<tr>");
            for (i, c) in self.pad(row).iter().enumerate() {
                s.push_str(&format!("<td{}>{}</td>", self.class(i), html_escape(c)));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody>\n</table>\n");
        if !self.footnotes.is_empty() {
            s.push_str("<ul class=\"notes\">\n");
            for f in &self.footnotes {
                s.push_str(&format!("<li>{}</li>\n", html_escape(f)));
            }
            s.push_str("</ul>\n");
        }
        s
    }

    fn html_group_row(&self) -> String {
        let mut s = String::from("<tr>");
        let mut covered = 0;
        for (name, span) in &self.groups {
            s.push_str(&format!(
                "<th colspan=\"{span}\" class=\"group\">{}</th>",
                html_escape(name)
            ));
            covered += span;
        }
        if covered < self.header.len() {
            s.push_str(&format!(
                "<th colspan=\"{}\"></th>",
                self.header.len() - covered
            ));
        }
        s.push_str("</tr>\n");
        s
    }

    fn class(&self, col: usize) -> &'static str {
        match self.align.get(col) {
            Some(Align::Right) => " class=\"num\"",
            _ => "",
        }
    }

    /// The row padded (or cut) to the header's width.
    fn pad(&self, row: &[String]) -> Vec<String> {
        let mut r = row.to_vec();
        r.resize(self.header.len(), String::new());
        r
    }
}

fn md_row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn md_cell(s: &str) -> String {
    md_escape(s).replace('|', "\\|")
}

/// Markdown text: newlines become spaces, HTML-significant `<` and `&` are escaped.
pub fn md_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace(['\n', '\r'], " ")
}

/// Escapes `& < > " '` for HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new("T <1>", vec!["a".into(), "b|c".into(), "d".into()]);
        t.groups = vec![("g".into(), 2)];
        t.push_row(vec!["x & y".into(), "1".into()]);
        t.footnotes.push("note".into());
        t
    }

    #[test]
    fn markdown_escapes_and_pads() {
        let md = sample().to_markdown();
        assert!(md.contains("**T &lt;1> **") || md.contains("**T &lt;1>**"));
        assert!(md.contains("| g · a | g · b\\|c | d |"));
        assert!(md.contains("| x &amp; y | 1 |  |"));
        assert!(md.contains("- note"));
    }

    #[test]
    fn html_escapes_and_spans() {
        let html = sample().to_html();
        assert!(html.contains("<caption>T &lt;1&gt;</caption>"));
        assert!(html.contains("colspan=\"2\""));
        assert!(html.contains("<td>x &amp; y</td>"));
        assert_eq!(html.matches("<td").count(), 3);
    }
}

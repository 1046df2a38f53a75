//! The text of a completion as it grows: the decoding of prompt + new tokens past the
//! decoded prompt (the way `formers generate` prints it: decoders may join or strip
//! spaces at token boundaries, and one character may span tokens), cut at the first stop
//! sequence, and released piece by piece without ever sending text that could still turn
//! out to be part of a stop sequence or of an unfinished character.

/// A completion's text, fed the full decoded sequence after every token.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Byte length of the decoded prompt.
    prompt_len: usize,
    stops: Vec<String>,
    /// The continuation so far (cut at a stop sequence once one is seen).
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
    stopped: bool,
}

impl Completion {
    /// A completion of a prompt that decodes to `prompt`, stopping at any of `stops`
    /// (empty strings are ignored).
    pub fn new(prompt: &str, stops: Vec<String>) -> Self {
        Completion {
            prompt_len: prompt.len(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Takes the decoding of prompt + all tokens so far. Returns true once a stop sequence
    /// has appeared (generation should end).
    pub fn update(&mut self, decoded: &str) -> bool {
        if self.stopped {
            return true;
        }
        // Decoders are prefix-stable in practice; should one not be, keep what was sent
        // and continue from where the texts part (sent text cannot be taken back).
        let cont = decoded.get(self.prompt_len..).unwrap_or("");
        let common = common_prefix(&self.text[..self.sent], cont);
        if common < self.sent {
            self.text.truncate(self.sent);
            self.text.push_str(&cont[common..]);
        } else {
            self.text = cont.to_string();
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[self.sent.min(self.text.len())..]
                    .find(s.as_str())
                    .map(|i| i + self.sent)
            })
            .min()
        {
            self.text.truncate(at);
            self.stopped = true;
        }
        self.stopped
    }

    /// Text not released yet that is safe to send: all of it once `last` or stopped, else
    /// held back while it ends in a replacement character (an unfinished character) or in
    /// the beginning of a stop sequence.
    pub fn take(&mut self, last: bool) -> String {
        let end = if last || self.stopped {
            self.text.len()
        } else {
            let mut end = self.text.len();
            if self.text.ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            let held = self
                .stops
                .iter()
                .map(|s| partial_suffix(&self.text[..end], s))
                .max()
                .unwrap_or(0);
            end - held
        };
        if end <= self.sent {
            return String::new();
        }
        let piece = self.text[self.sent..end].to_string();
        self.sent = end;
        piece
    }

    /// The whole text (cut at a stop sequence).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a stop sequence ended it.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

/// Byte length of the longest common prefix of `a` and `b` (at a character boundary).
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .take_while(|((_, x), y)| x == y)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8())
}

/// Byte length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .skip(1)
        .map(|(i, _)| &stop[..i])
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::Completion;

    #[test]
    fn pieces_join_to_the_text_and_stop_before_the_stop_sequence() {
        let mut c = Completion::new("Hi", vec!["END".into()]);
        let mut out = String::new();
        for s in [
            "Hi there",
            "Hi there E",
            "Hi there EN",
            "Hi there ENX",
            "Hi there ENX END more",
        ] {
            c.update(s);
            out.push_str(&c.take(false));
        }
        assert!(c.stopped());
        assert_eq!(out, " there ENX ");
        assert_eq!(c.text(), " there ENX ");
    }

    #[test]
    fn an_unfinished_character_is_held_back() {
        let mut c = Completion::new("", vec![]);
        c.update("a\u{FFFD}");
        assert_eq!(c.take(false), "a");
        c.update("aé");
        assert_eq!(c.take(false), "é");
        c.update("aé\u{FFFD}");
        assert_eq!(c.take(true), "\u{FFFD}");
    }
}

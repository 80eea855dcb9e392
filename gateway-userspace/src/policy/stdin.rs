//! Line rules over what is typed on the stdin of an allowed exec or attach session
//! (`exec.stdinLines` of an `allow` or `mask` rule), and the line assembler that turns the
//! stdin bytes of a session into the completed lines the rules are checked against.
//!
//! Line rules are best effort (docs/policy-reference.md says why): the gateway sees the
//! bytes the client sends, not the command the process runs. With a tty it replays the
//! simplest line editing (backspace, `^U`, `^W`, `^C`, escape sequences dropped), but tab
//! completion, history recall, pasted text with cursor moves, here-documents and encoded
//! payloads (`echo cm0gLXJmIC8K | base64 -d | sh`) can all build a line no pattern sees.

use std::sync::Arc;

use regex::Regex;

/// Longest line the assembler holds. A line that grows past it is checked as a line of
/// its own; its second half is kept, so a pattern over the boundary is still seen.
pub const MAX_STDIN_LINE: usize = 4096;

/// One `stdinLines.deny` pattern, compiled.
#[derive(Debug)]
struct LineRule {
    rule: Arc<str>,
    index: usize,
    pattern: Regex,
    message: Option<Arc<str>>,
}

/// The compiled `stdinLines` of one or more rules: a session is closed when a completed
/// stdin line matches any pattern.
#[derive(Debug, Default)]
pub struct StdinLineRules {
    rules: Vec<LineRule>,
}

impl PartialEq for StdinLineRules {
    fn eq(&self, other: &Self) -> bool {
        self.rules.len() == other.rules.len()
            && self.rules.iter().zip(&other.rules).all(|(a, b)| {
                a.rule == b.rule && a.index == b.index && a.pattern.as_str() == b.pattern.as_str()
            })
    }
}

impl Eq for StdinLineRules {}

impl StdinLineRules {
    /// Compiles a rule's `deny` patterns; the error names the pattern's index.
    pub(super) fn compile(
        rule: &str,
        deny: &[String],
        message: Option<&str>,
    ) -> Result<StdinLineRules, (usize, String)> {
        let rule: Arc<str> = Arc::from(rule);
        let message = message.map(Arc::from);
        let rules = deny
            .iter()
            .enumerate()
            .map(|(index, source)| {
                if source.is_empty() {
                    return Err((index, "empty pattern".to_owned()));
                }
                let pattern = regex::RegexBuilder::new(source)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| (index, format!("invalid regex: {e}")))?;
                Ok(LineRule {
                    rule: rule.clone(),
                    index,
                    pattern,
                    message: message.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StdinLineRules { rules })
    }

    /// Every rule's patterns together (the rules that matched one request).
    pub(super) fn combine<'a>(parts: impl IntoIterator<Item = &'a StdinLineRules>) -> Self {
        let rules = parts
            .into_iter()
            .flat_map(|p| p.rules.iter())
            .map(|r| LineRule {
                rule: r.rule.clone(),
                index: r.index,
                pattern: r.pattern.clone(),
                message: r.message.clone(),
            })
            .collect();
        StdinLineRules { rules }
    }

    /// The names of the rules whose patterns these are, in order, without repeats.
    pub fn rule_names(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for r in &self.rules {
            if !out.contains(&r.rule) {
                out.push(r.rule.clone());
            }
        }
        out
    }

    /// The first pattern `line` matches (anywhere in the line, as `grep -E` does).
    pub fn check(&self, line: &str) -> Option<LineViolation> {
        self.rules
            .iter()
            .find(|r| r.pattern.is_match(line))
            .map(|r| LineViolation {
                rule: r.rule.clone(),
                index: r.index,
                pattern: r.pattern.as_str().to_owned(),
                message: r.message.clone(),
            })
    }
}

/// A completed stdin line matched a `stdinLines.deny` pattern. The line itself is not
/// kept: it may hold a secret the agent typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineViolation {
    /// The rule whose pattern matched.
    pub rule: Arc<str>,
    /// The pattern's index in `stdinLines.deny`.
    pub index: usize,
    /// The pattern.
    pub pattern: String,
    /// The rule's `stdinLines.message`, if it has one.
    pub message: Option<Arc<str>>,
}

impl LineViolation {
    /// A sentence for the client and the recording.
    pub fn reason(&self) -> String {
        let mut out = format!(
            "stream closed by Chaperone policy rule \"{}\": a stdin line matched stdinLines.deny[{}] ({})",
            self.rule, self.index, self.pattern
        );
        if let Some(m) = &self.message {
            out.push_str(": ");
            out.push_str(m);
        }
        out
    }
}

/// Where the assembler is in a terminal escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Start,
    /// In a CSI (`ESC [`) or SS3 (`ESC O`) sequence, until its final byte.
    Sequence,
}

/// Turns one session's stdin bytes into completed lines and checks each against the
/// rules (see the module docs for what "line" means with and without a tty).
#[derive(Debug)]
pub struct StdinLineWatcher {
    rules: Arc<StdinLineRules>,
    tty: bool,
    line: Vec<u8>,
    escape: Escape,
    lines: u64,
}

impl StdinLineWatcher {
    /// A watcher at the start of a session; `tty` turns on the line-editing replay.
    pub fn new(rules: Arc<StdinLineRules>, tty: bool) -> Self {
        Self {
            rules,
            tty,
            line: Vec::new(),
            escape: Escape::None,
            lines: 0,
        }
    }

    /// Lines checked so far.
    pub fn lines_checked(&self) -> u64 {
        self.lines
    }

    /// Feeds stdin bytes; the first violation among the lines they complete, if any.
    pub fn push(&mut self, data: &[u8]) -> Option<LineViolation> {
        for &b in data {
            if let Some(v) = self.byte(b) {
                return Some(v);
            }
        }
        None
    }

    /// Stdin ended: a last line without a line end is still a line (a shell runs it).
    pub fn finish(&mut self) -> Option<LineViolation> {
        self.complete()
    }

    fn byte(&mut self, b: u8) -> Option<LineViolation> {
        if self.tty {
            match self.escape {
                Escape::Start => {
                    self.escape = if b == b'[' || b == b'O' {
                        Escape::Sequence
                    } else {
                        Escape::None
                    };
                    return None;
                }
                Escape::Sequence => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    return None;
                }
                Escape::None => {}
            }
            match b {
                0x1b => {
                    self.escape = Escape::Start;
                    return None;
                }
                // Backspace / DEL: one character (UTF-8 continuation bytes with it).
                0x7f | 0x08 => {
                    while let Some(last) = self.line.pop() {
                        if last & 0xc0 != 0x80 {
                            break;
                        }
                    }
                    return None;
                }
                // ^U kills the line, ^C abandons it.
                0x15 | 0x03 => {
                    self.line.clear();
                    return None;
                }
                // ^W erases the previous word.
                0x17 => {
                    while self.line.last().is_some_and(|c| *c == b' ') {
                        self.line.pop();
                    }
                    while self.line.last().is_some_and(|c| *c != b' ') {
                        self.line.pop();
                    }
                    return None;
                }
                // ^D on an empty line ends input; elsewhere shells ignore it.
                0x04 => return self.complete(),
                _ => {}
            }
        }
        if b == b'\n' || b == b'\r' {
            return self.complete();
        }
        self.line.push(b);
        if self.line.len() >= MAX_STDIN_LINE {
            let found = self.check_line();
            // Keep the second half: a pattern across the cut is still seen.
            self.line.drain(..MAX_STDIN_LINE / 2);
            return found;
        }
        None
    }

    fn complete(&mut self) -> Option<LineViolation> {
        let found = self.check_line();
        self.line.clear();
        found
    }

    fn check_line(&mut self) -> Option<LineViolation> {
        if self.line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        self.lines += 1;
        self.rules.check(&String::from_utf8_lossy(&self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(patterns: &[&str]) -> Arc<StdinLineRules> {
        let deny: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Arc::new(StdinLineRules::compile("r", &deny, Some("no")).expect("compiles"))
    }

    #[test]
    fn completed_lines_are_checked_not_partial_ones() {
        let mut w = StdinLineWatcher::new(rules(&[r"rm\s+-rf"]), false);
        assert_eq!(w.push(b"echo ok\nrm -r"), None);
        assert_eq!(w.push(b"f /tm"), None, "no line end yet");
        let v = w.push(b"p\n").expect("the completed line matches");
        assert_eq!((&*v.rule, v.index), ("r", 0));
        assert!(v.reason().contains("stdinLines.deny[0]"), "{}", v.reason());
        assert!(v.reason().ends_with(": no"), "{}", v.reason());
        assert_eq!(w.lines_checked(), 2);
    }

    #[test]
    fn a_last_line_without_a_newline_counts_at_the_end_of_stdin() {
        let mut w = StdinLineWatcher::new(rules(&["^shutdown"]), false);
        assert_eq!(w.push(b"shutdown now"), None);
        assert!(w.finish().is_some());
    }

    #[test]
    fn tty_editing_is_replayed() {
        let r = rules(&["^rm -rf /$"]);
        // Typed with a typo fixed by backspace, and arrow keys pressed on the way.
        let mut w = StdinLineWatcher::new(r.clone(), true);
        assert!(w.push(b"rm -rx\x7ff \x1b[D\x1b[C/\r").is_some());
        // ^U kills what was typed: the line that runs is harmless.
        let mut w = StdinLineWatcher::new(r.clone(), true);
        assert_eq!(w.push(b"rm -rf /\x15ls\r"), None);
        // ^W erases a word.
        let mut w = StdinLineWatcher::new(r.clone(), true);
        assert!(w.push(b"rm -rf /tmp\x17/\r").is_some());
        // Without a tty the bytes are the line: backspace is a character.
        let mut w = StdinLineWatcher::new(r, false);
        assert_eq!(w.push(b"rm -rx\x7ff /\n"), None);
    }

    #[test]
    fn an_over_long_line_counts_as_a_line_and_the_buffer_stays_bounded() {
        let mut w = StdinLineWatcher::new(rules(&["secret-command"]), false);
        let mut data = vec![b'x'; MAX_STDIN_LINE - 5];
        data.extend_from_slice(b"secret-command");
        let found = w.push(&data).or_else(|| w.finish());
        assert!(found.is_some(), "matched across the cut");
        let mut w = StdinLineWatcher::new(rules(&["never"]), false);
        for _ in 0..100 {
            assert_eq!(w.push(&[b'y'; 1000]), None);
            assert!(w.line.len() < MAX_STDIN_LINE);
        }
    }

    #[test]
    fn bad_patterns_name_their_index() {
        let deny = vec!["ok".to_owned(), "(".to_owned()];
        let (i, why) = StdinLineRules::compile("r", &deny, None).expect_err("invalid");
        assert_eq!(i, 1);
        assert!(why.contains("invalid regex"), "{why}");
        let (i, _) = StdinLineRules::compile("r", &[String::new()], None).expect_err("empty");
        assert_eq!(i, 0);
    }
}

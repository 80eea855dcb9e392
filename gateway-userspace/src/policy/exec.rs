//! Exec and attach conditions: a rule's `exec:` block, matched against the command, the
//! container and the stdin/tty flags of a `pods/exec` or `pods/attach` request.

use std::sync::Arc;

use regex::Regex;

use super::{model::RawExec, stdin::StdinLineRules};
use crate::request::ExecRequest;

/// Shells whose `-c SCRIPT` is matched as a command of its own.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ash", "ksh", "busybox"];

/// A compiled `exec:` block.
#[derive(Debug)]
pub(super) struct ExecCond {
    commands: Box<[Glob]>,
    programs: Box<[Glob]>,
    regexes: Box<[Regex]>,
    interactive: Option<bool>,
    containers: Option<Box<[Glob]>>,
    /// `stdinLines`: applied to the session when the rule allows it.
    pub(super) stdin_lines: Option<Arc<StdinLineRules>>,
}

/// Where in an `exec:` block a value was wrong, and why.
pub(super) struct ExecError {
    pub(super) key: &'static str,
    /// A key under `key` (`stdinLines.deny`).
    pub(super) sub: Option<&'static str>,
    pub(super) index: Option<usize>,
    pub(super) message: String,
}

impl ExecCond {
    pub(super) fn compile(raw: &RawExec, rule: &str) -> Result<ExecCond, ExecError> {
        let err = |key, index, message: String| ExecError {
            key,
            sub: None,
            index,
            message,
        };
        let globs =
            |key: &'static str, list: &Option<Vec<String>>| -> Result<Box<[Glob]>, ExecError> {
                let list = list.as_deref().unwrap_or_default();
                if list.is_empty() && raw_has(raw, key) {
                    return Err(err(
                        key,
                        None,
                        "must not be empty; omit the key instead".to_owned(),
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, g)| {
                        if g.trim().is_empty() {
                            Err(err(key, Some(i), "empty pattern".to_owned()))
                        } else {
                            Ok(Glob::new(g))
                        }
                    })
                    .collect()
            };
        let commands = globs("commands", &raw.commands)?;
        let programs = globs("programs", &raw.programs)?;
        let containers = match &raw.containers {
            None => None,
            Some(_) => Some(globs("containers", &raw.containers)?),
        };
        let regexes = raw
            .command_regexes
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                regex::RegexBuilder::new(r)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| err("commandRegexes", Some(i), format!("invalid regex: {e}")))
            })
            .collect::<Result<Box<[Regex]>, _>>()?;
        if raw.command_regexes.as_ref().is_some_and(Vec::is_empty) {
            return Err(err(
                "commandRegexes",
                None,
                "must not be empty; omit the key instead".to_owned(),
            ));
        }
        let stdin_lines = match &raw.stdin_lines {
            None => None,
            Some(lines) if lines.deny.is_empty() => {
                return Err(ExecError {
                    key: "stdinLines",
                    sub: Some("deny"),
                    index: None,
                    message: "lists no pattern; omit stdinLines instead".to_owned(),
                });
            }
            Some(lines) => Some(Arc::new(
                StdinLineRules::compile(rule, &lines.deny, lines.message.as_deref()).map_err(
                    |(i, message)| ExecError {
                        key: "stdinLines",
                        sub: Some("deny"),
                        index: Some(i),
                        message,
                    },
                )?,
            )),
        };
        Ok(ExecCond {
            commands,
            programs,
            regexes,
            interactive: raw.interactive,
            containers,
            stdin_lines,
        })
    }

    /// Whether an exec/attach request matches; `None` (not an exec or attach) never does.
    /// `lines` caches the request's command lines across the rules of one decision.
    pub(super) fn matches(
        &self,
        exec: Option<&ExecRequest>,
        lines: &mut Option<Option<CommandLines>>,
    ) -> bool {
        let Some(exec) = exec else {
            return false;
        };
        if let Some(want) = self.interactive
            && want != (exec.stdin || exec.tty)
        {
            return false;
        }
        if let Some(containers) = &self.containers
            && !containers.iter().any(|g| g.matches(&exec.container))
        {
            return false;
        }
        if self.commands.is_empty() && self.programs.is_empty() && self.regexes.is_empty() {
            return true;
        }
        // attach runs no command: command matchers never match it.
        let Some(lines) = lines.get_or_insert_with(|| CommandLines::of(exec)) else {
            return false;
        };
        if self.programs.iter().any(|g| g.matches(&lines.base)) {
            return true;
        }
        lines.forms.iter().any(|c| {
            self.commands.iter().any(|g| g.matches(c)) || self.regexes.iter().any(|r| r.is_match(c))
        })
    }
}

/// The strings command matchers look at, built once per request.
#[derive(Debug)]
pub(super) struct CommandLines {
    /// argv[0]'s base name.
    base: String,
    /// The joined argv, the same with argv[0] as its base name, and a shell's `-c` script.
    forms: Vec<String>,
}

impl CommandLines {
    /// `None` when the request runs no command (attach).
    fn of(exec: &ExecRequest) -> Option<CommandLines> {
        let program = exec.command.first()?;
        let base = base_name(program);
        let mut forms = vec![exec.command.join(" ")];
        if base != program.as_str() {
            let mut with_base = vec![base.to_owned()];
            with_base.extend(exec.command[1..].iter().cloned());
            forms.push(with_base.join(" "));
        }
        // `sh -c 'rm -rf /'`: the script is a command too (best effort: a shell can always
        // build a command line at run time that no pattern sees).
        if SHELLS.contains(&base)
            && let Some(at) = exec.command.iter().position(|a| a == "-c")
            && let Some(script) = exec.command.get(at + 1)
        {
            forms.push(script.trim().to_owned());
        }
        Some(CommandLines {
            base: base.to_owned(),
            forms,
        })
    }
}

fn raw_has(raw: &RawExec, key: &str) -> bool {
    match key {
        "commands" => raw.commands.is_some(),
        "programs" => raw.programs.is_some(),
        "containers" => raw.containers.is_some(),
        _ => false,
    }
}

/// The last path segment of a program (`/bin/rm` → `rm`).
fn base_name(program: &str) -> &str {
    program.rsplit('/').next().unwrap_or(program)
}

/// A shell-style pattern over a whole string: `*` is any run of characters (spaces and
/// slashes included), `?` any one character, everything else itself.
#[derive(Debug, Clone)]
pub(super) struct Glob(Box<[char]>);

impl Glob {
    pub(super) fn new(pattern: &str) -> Glob {
        Glob(pattern.chars().collect())
    }

    /// Linear-space matching with single-star backtracking: O(pattern × text) at worst.
    pub(super) fn matches(&self, text: &str) -> bool {
        let p = &self.0;
        let t: Vec<char> = text.chars().collect();
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_strings() {
        let cases = [
            ("rm -rf *", "rm -rf /", true),
            ("rm -rf *", "rm -rf", false),
            ("rm -rf *", "xrm -rf /", false),
            ("*sh", "bash", true),
            ("*sh", "bash -i", false),
            ("b?sh", "bash", true),
            ("ls", "ls", true),
            ("ls", "ls -la", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(Glob::new(pattern).matches(text), want, "{pattern} ~ {text}");
        }
    }

    fn exec(command: &[&str], stdin: bool, tty: bool) -> ExecRequest {
        ExecRequest {
            command: command.iter().map(|s| s.to_string()).collect(),
            container: "app".to_owned(),
            stdin,
            tty,
        }
    }

    fn cond(yaml: &str) -> ExecCond {
        let raw: RawExec = serde_norway::from_str(yaml).expect("raw exec");
        ExecCond::compile(&raw, "r").unwrap_or_else(|e| panic!("{}: {}", e.key, e.message))
    }

    #[test]
    fn commands_match_the_joined_argv_its_base_name_form_and_shell_scripts() {
        let c = cond("commands: ['rm -rf *']");
        assert!(c.matches(Some(&exec(&["rm", "-rf", "/"], false, false)), &mut None));
        assert!(c.matches(
            Some(&exec(&["/bin/rm", "-rf", "/tmp"], false, false)),
            &mut None
        ));
        assert!(c.matches(
            Some(&exec(&["sh", "-c", "rm -rf /"], false, false)),
            &mut None
        ));
        assert!(!c.matches(Some(&exec(&["ls"], false, false)), &mut None));
        assert!(
            !c.matches(Some(&exec(&[], true, true)), &mut None),
            "attach runs no command"
        );
        assert!(!c.matches(None, &mut None), "not an exec");
    }

    #[test]
    fn programs_regexes_interactive_and_containers() {
        let shells = cond("programs: [sh, bash, '*sh']\ninteractive: true");
        assert!(shells.matches(Some(&exec(&["/bin/bash"], true, true)), &mut None));
        assert!(shells.matches(Some(&exec(&["zsh"], true, false)), &mut None));
        assert!(
            !shells.matches(Some(&exec(&["bash", "-c", "ls"], false, false)), &mut None),
            "non-interactive"
        );
        let re = cond("commandRegexes: ['curl .*\\|\\s*(ba)?sh']");
        assert!(re.matches(
            Some(&exec(&["sh", "-c", "curl x | sh"], false, false)),
            &mut None
        ));
        assert!(!re.matches(Some(&exec(&["curl", "x"], false, false)), &mut None));
        let side = cond("containers: ['side*']");
        assert!(!side.matches(Some(&exec(&["ls"], false, false)), &mut None));
        let any_interactive = cond("interactive: true");
        assert!(
            any_interactive.matches(Some(&exec(&[], true, true)), &mut None),
            "attach with a tty"
        );
    }

    #[test]
    fn bad_exec_blocks_are_load_errors() {
        for (yaml, key) in [
            ("commands: []", "commands"),
            ("commandRegexes: ['(']", "commandRegexes"),
            ("containers: ['']", "containers"),
            ("stdinLines: {deny: []}", "stdinLines"),
            ("stdinLines: {deny: ['[']}", "stdinLines"),
        ] {
            let raw: RawExec = serde_norway::from_str(yaml).expect("raw exec");
            let e = ExecCond::compile(&raw, "r").expect_err(yaml);
            assert_eq!(e.key, key, "{yaml}: {}", e.message);
        }
    }
}

//! One problem found in a pipeline or its data, printed on one line:
//! `file:line:column: what is wrong — what to do`.

use std::fmt;

use super::yaml::Pos;

/// A problem with a place, a message and, when there is one, a fix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// The file the problem is in, as the user named it.
    pub file: String,
    /// Line and column in `file`, when the problem has a place in a YAML file.
    pub pos: Option<Pos>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A problem at `pos` in `file`.
    pub fn at(file: impl Into<String>, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            pos: (pos != Pos::default()).then_some(pos),
            message: message.into(),
            hint: None,
        }
    }

    /// A problem with a whole file (or a row of it, named in the message).
    pub fn in_file(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            pos: None,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds what to do.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if let Some(pos) = self.pos {
            write!(f, "{pos}:")?;
        }
        // Messages from parsers can span lines; the contract is one line per problem.
        write!(f, " {}", one_line(&self.message))?;
        if let Some(hint) = &self.hint {
            write!(f, " — {}", one_line(hint))?;
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_one_line_with_place_and_hint() {
        let d = Diagnostic::at(
            "p.yaml",
            Pos { line: 3, column: 5 },
            "unknown key `outptus`\nhere",
        )
        .hint("did you mean `outputs`?");
        assert_eq!(
            d.to_string(),
            "p.yaml:3:5: unknown key `outptus` here — did you mean `outputs`?"
        );
        assert_eq!(
            Diagnostic::in_file("d.csv", "row 3: bad").to_string(),
            "d.csv: row 3: bad"
        );
    }

    #[test]
    fn suggests_close_words_only() {
        let keys = ["sources", "tasks", "steps", "outputs"];
        assert_eq!(did_you_mean("outptus", keys), Some("outputs"));
        assert_eq!(did_you_mean("Steps", keys), Some("steps"));
        assert_eq!(did_you_mean("banana", keys), None);
    }
}

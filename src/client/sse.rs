//! A Server-Sent Events parser (the WHATWG event-stream format) that works in one pass:
//! complete lines are read straight out of each received chunk, and only a line cut by a
//! chunk boundary is copied aside, so the cost is linear in the body and independent of how
//! the body is chunked.

use std::collections::VecDeque;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `message` when the frame had none.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The last `id:` seen on the stream so far (empty when none).
    pub id: String,
}

/// Incremental parser state.
#[derive(Debug, Default)]
pub struct Parser {
    /// A line cut by the end of the last chunk.
    partial: Vec<u8>,
    /// The last chunk ended with `\r`: a `\n` starting the next one belongs to it.
    skip_lf: bool,
    /// At the start of the stream: a byte-order mark is dropped.
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    id: String,
}

impl Parser {
    /// Parses `chunk`, appending each event it completes to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut VecDeque<Event>) {
        if !self.started {
            let mut head = std::mem::take(&mut self.partial);
            head.extend_from_slice(chunk);
            if head.len() < BOM.len() && BOM.starts_with(&head) {
                // Too short to tell; kept until the next chunk decides.
                self.partial = head;
                return;
            }
            self.started = true;
            let rest = head.strip_prefix(BOM).unwrap_or(&head);
            self.feed(rest, out);
            return;
        }
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            if self.partial.is_empty() {
                self.line(&chunk[..end], out);
            } else {
                self.partial.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line, out);
                self.partial = line;
                self.partial.clear();
            }
            let cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.partial.extend_from_slice(chunk);
    }

    /// Whether the stream so far ended exactly after a complete frame (no partial line and
    /// no fields waiting for their blank line).
    pub fn at_boundary(&self) -> bool {
        self.partial.is_empty() && !self.has_data && self.event.is_empty()
    }

    fn line(&mut self, line: &[u8], out: &mut VecDeque<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.has_data = true;
                push_utf8(&mut self.data, value);
            }
            b"event" => {
                self.event.clear();
                push_utf8(&mut self.event, value);
            }
            b"id" if !value.contains(&0) => {
                self.id.clear();
                push_utf8(&mut self.id, value);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<Event>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push_back(Event {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.id.clone(),
        });
    }
}

fn push_utf8(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => out.push_str(s),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(chunks: &[&[u8]]) -> (Vec<Event>, bool) {
        let mut p = Parser::default();
        let mut out = VecDeque::new();
        for c in chunks {
            p.feed(c, &mut out);
        }
        (out.into_iter().collect(), p.at_boundary())
    }

    fn ev(event: &str, data: &str, id: &str) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
            id: id.into(),
        }
    }

    #[test]
    fn frames_fields_and_comments() {
        let body = b"\xEF\xBB\xBF: ping\n\nevent: task_run.state\ndata: {\"a\":1}\n\n\
            data:first\ndata: second\nid: 7\nretry: 10\nunknown: x\n\n\
            event: empty\n\n\
            data\n\n";
        let (events, boundary) = parse_in(&[body]);
        assert_eq!(
            events,
            vec![
                ev("task_run.state", "{\"a\":1}", ""),
                ev("message", "first\nsecond", "7"),
                ev("message", "", "7"),
            ]
        );
        assert!(boundary);
    }

    #[test]
    fn every_split_and_line_ending_gives_the_same_events() {
        let lf = b"event: a\ndata: x:y\ndata:  z\n\nevent: b\ndata: \xC3\xA9\n\n".to_vec();
        let want = parse_in(&[&lf]).0;
        assert_eq!(want, vec![ev("a", "x:y\n z", ""), ev("b", "é", "")]);
        let crlf: Vec<u8> = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        let cr: Vec<u8> = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r")
            .into_bytes();
        for body in [&lf, &crlf, &cr] {
            for i in 0..=body.len() {
                for j in i..=body.len() {
                    let (events, boundary) = parse_in(&[&body[..i], &body[i..j], &body[j..]]);
                    assert_eq!(events, want, "split at {i}, {j}");
                    // A lone CR at the very end may still be followed by its LF.
                    assert!(boundary || body.ends_with(b"\r"), "split at {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn a_cut_frame_is_not_at_a_boundary() {
        assert!(!parse_in(&[b"data: {\"a\""]).1);
        assert!(!parse_in(&[b"data: {}\n"]).1);
        assert!(!parse_in(&[b"event: x\n"]).1);
        assert!(parse_in(&[b"data: {}\n\n"]).1);
        assert!(parse_in(&[b""]).1);
        // A BOM split over chunks is still dropped.
        let (events, _) = parse_in(&[b"\xEF", b"\xBB", b"\xBFdata: 1\n\n"]);
        assert_eq!(events, vec![ev("message", "1", "")]);
    }
}

//! The `sim` processor: outputs that conform to the run's output schema, derived only from
//! a hash of (input, task spec), so the same run always gives the same answer at no cost.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Job, ProcessFuture, Processor, RunFailure};
#[cfg(test)]
use crate::api::TaskRunOutput;
use crate::api::{Schema, TaskSpec};
use crate::server::SimConfig;

/// Deepest schema nesting the generator follows (guards recursive `$ref`s).
const MAX_GEN_DEPTH: usize = 12;
/// The largest output the sim writes. A schema may ask for more (a `minLength` or
/// `minItems` in the millions, an array whose `maxItems` is that large, objects whose
/// `$ref`s repeat them level after level): such a run fails
/// instead of holding the server's memory and its scheduler for as long as it writes.
const MAX_OUTPUT_BYTES: usize = 4 << 20;

/// The simulated processor.
#[derive(Debug, Default)]
pub struct Sim {
    config: SimConfig,
    /// The last spec seen, with what its part of the seed takes (see [`Sim::seed`]).
    spec_cache: Mutex<Option<CachedSpec>>,
}

/// A spec, its canonical JSON, and that JSON's step of the seed's hash.
#[derive(Debug)]
struct CachedSpec {
    spec: Arc<TaskSpec>,
    canonical: Vec<u8>,
    step: Arc<FnvStep>,
}

impl Sim {
    /// A simulator with the given latency and failure rate.
    pub fn new(config: SimConfig) -> Sim {
        Sim {
            config,
            spec_cache: Mutex::new(None),
        }
    }

    /// The stable seed of a run: FNV-1a over canonical JSON of the input and spec.
    #[cfg(test)]
    pub fn seed(input: &Value, spec: Option<&TaskSpec>) -> u64 {
        let spec = spec.map(spec_canonical);
        seed_of(input, spec.as_deref())
    }

    /// [`Sim::seed`], with the spec's part of the hash worked out once per spec: the runs
    /// of a claimed batch share one `Arc`, and each batch of added runs has a spec row of
    /// its own, which is compared by its canonical JSON. (Hashing the spec's canonical
    /// JSON, ≈ 600 bytes for the benchmark's schema, was 3% of the server's CPU.)
    fn seed_cached(&self, input: &Value, spec: Option<&Arc<TaskSpec>>) -> u64 {
        let head = seed_of(input, None);
        let Some(spec) = spec else {
            return head;
        };
        let cache = || self.spec_cache.lock().unwrap_or_else(|p| p.into_inner());
        let same = cache()
            .as_ref()
            .filter(|c| Arc::ptr_eq(&c.spec, spec))
            .map(|c| c.step.clone());
        let step = same.unwrap_or_else(|| {
            let canonical = spec_canonical(spec);
            let mut cache = cache();
            let step = match cache.as_ref() {
                Some(c) if c.canonical == canonical => c.step.clone(),
                _ => Arc::new(FnvStep::over(&canonical)),
            };
            *cache = Some(CachedSpec {
                spec: spec.clone(),
                canonical,
                step: step.clone(),
            });
            step
        });
        step.apply(head)
    }

    /// How long the run takes: a point of the configured range chosen by the seed.
    pub fn latency(&self, seed: u64) -> Duration {
        let (lo, hi) = (*self.config.latency.start(), *self.config.latency.end());
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo).as_micros() as f64;
        lo + Duration::from_micros((unit(mix(seed ^ 0x5eed_1a7e)) * span) as u64)
    }

    /// Whether the run fails: a fraction `failure_rate` of seeds do.
    pub fn fails(&self, seed: u64) -> bool {
        unit(mix(seed ^ 0xfa11_u64)) < self.config.failure_rate
    }

    /// The run's outcome, computed without waiting.
    #[cfg(test)]
    pub fn outcome(&self, job: &Job) -> Result<TaskRunOutput, RunFailure> {
        let text = self.outcome_seeded(job, Sim::seed(&job.input, job.spec.as_deref()))?;
        Ok(serde_json::from_str(&text).expect("the sim writes a TaskRunOutput"))
    }

    /// The run's output as the JSON text of a [`TaskRunOutput`], written as it is
    /// generated. Building a `Value` tree and the output's structs, then serializing and
    /// dropping them, cost the server about 7% more CPU with latency 0.
    fn outcome_seeded(&self, job: &Job, seed: u64) -> Result<String, RunFailure> {
        if self.fails(seed) {
            return Err(RunFailure {
                message: "Simulated failure: the sim processor failed this run on purpose"
                    .to_string(),
                detail: Some(json!({
                    "processor": job.processor,
                    "executed_by": "sim",
                    "seed": format!("{seed:016x}")
                })),
            });
        }
        let subject = subject(&job.input);
        let mut subject_json = Vec::with_capacity(subject.len() + 8);
        escape_into(&mut subject_json, subject.as_bytes());
        let mut g = Gen {
            rng: Rng(seed),
            subject,
            subject_json,
            too_big: false,
        };
        let mut out = Vec::with_capacity(4096);
        match job.spec.as_deref().map(|s| &s.output_schema) {
            Some(Schema::Json { json_schema }) => {
                out.extend_from_slice(br#"{"type":"json","content":"#);
                let content = g.value(json_schema, json_schema, "output", 0, &mut out);
                g.basis(content, &mut out);
            }
            Some(Schema::Text { description }) => {
                out.extend_from_slice(br#"{"type":"text","content":"#);
                write_str(&mut out, &g.paragraph(description.as_deref()));
                g.basis(Written::Other, &mut out);
            }
            Some(Schema::Auto) | None => {
                let schema = auto_schema();
                out.extend_from_slice(br#"{"type":"json","content":"#);
                let content = g.value(&schema, &schema, "output", 0, &mut out);
                g.basis(content, &mut out);
                out.extend_from_slice(br#","output_schema":"#);
                write_value(&mut out, &schema);
            }
        }
        if g.too_big {
            return Err(RunFailure {
                message: format!(
                    "The output schema asks for more than the sim processor writes ({} MiB at most): a minLength, minItems or maxItems, or `$ref`s nested many times over, ask for too much",
                    MAX_OUTPUT_BYTES >> 20
                ),
                detail: Some(json!({"processor": job.processor, "executed_by": "sim"})),
            });
        }
        out.push(b'}');
        Ok(String::from_utf8(out).expect("JSON written from strings is UTF-8"))
    }
}

impl Processor for Sim {
    fn process<'a>(&'a self, job: &'a Job) -> ProcessFuture<'a> {
        Box::pin(async move {
            let seed = self.seed_cached(&job.input, job.spec.as_ref());
            let wait = self.latency(seed);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.outcome_seeded(job, seed)
        })
    }

    /// (A run with latency computes its seed twice, here and in `process`: microseconds
    /// against its wait.)
    fn process_now(&self, job: &Job) -> Option<Result<String, RunFailure>> {
        let seed = self.seed_cached(&job.input, job.spec.as_ref());
        if !self.latency(seed).is_zero() {
            return None;
        }
        Some(self.outcome_seeded(job, seed))
    }

    fn instant(&self) -> bool {
        self.config.latency.end().is_zero()
    }
}

/// The schema the simulator answers auto-schema runs with.
fn auto_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "Short answer"},
            "key_facts": {"type": "array", "items": {"type": "string"}},
            "confidence_score": {"type": "number", "minimum": 0, "maximum": 1}
        },
        "required": ["summary", "key_facts", "confidence_score"],
        "additionalProperties": false
    })
}

/// What the run is about, for readable strings: the input text or its first string value.
fn subject(input: &Value) -> String {
    let s = match input {
        Value::String(s) => s.clone(),
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            keys.iter()
                .find_map(|k| m[k.as_str()].as_str().map(str::to_string))
                .unwrap_or_else(|| "the input".to_string())
        }
        other => other.to_string(),
    };
    s.chars().take(60).collect()
}

/// FNV-1a of canonical JSON of the input, a `\u{1}`, and the spec's canonical JSON (when
/// the spec has one), written straight into the hash.
fn seed_of(input: &Value, spec: Option<&[u8]>) -> u64 {
    let mut h = Fnv::default();
    canonical(input, &mut h);
    h.write_all(b"\x01");
    if let Some(spec) = spec {
        h.write_all(spec);
    }
    h.0
}

/// Canonical JSON of a spec as the wire has it (empty if it cannot be serialized).
fn spec_canonical(spec: &TaskSpec) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(v) = serde_json::to_value(spec) {
        canonical(&v, &mut out);
    }
    out
}

/// Where canonical JSON goes: a hash or a buffer.
trait Sink {
    fn write_all(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn write_all(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A running FNV-1a hash.
struct Fnv(u64);

const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a over a fixed byte string, applied to any running hash in one step. XOR with a
/// byte changes only the low eight bits, so the low eight bits of every state along the
/// string follow from those of the first; each XOR then adds an amount fixed by them, and
/// after `n` bytes the hash is `h * PRIME^n + add[h & 0xff]`.
#[derive(Debug)]
struct FnvStep {
    pow: u64,
    add: Box<[u64; 256]>,
}

impl FnvStep {
    fn over(bytes: &[u8]) -> FnvStep {
        let pow = bytes.iter().fold(1u64, |p, _| p.wrapping_mul(FNV_PRIME));
        let mut add = Box::new([0u64; 256]);
        for (low, a) in add.iter_mut().enumerate() {
            let mut h = Fnv(low as u64);
            h.write_all(bytes);
            *a = h.0.wrapping_sub((low as u64).wrapping_mul(pow));
        }
        FnvStep { pow, add }
    }

    /// The hash `h` continued over the bytes.
    fn apply(&self, h: u64) -> u64 {
        h.wrapping_mul(self.pow)
            .wrapping_add(self.add[(h & 0xff) as usize])
    }
}

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Sink for Fnv {
    fn write_all(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }
}

/// Lets serde_json write scalars into a [`Sink`].
struct SinkWriter<'a, S: Sink>(&'a mut S);

impl<S: Sink> std::io::Write for SinkWriter<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// JSON with object keys sorted, so equal values hash equally whatever their key order
/// (compact, strings escaped as serde_json writes them).
fn canonical<S: Sink>(v: &Value, out: &mut S) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.write_all(b"{");
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",");
                }
                let _ = serde_json::to_writer(SinkWriter(out), k.as_str());
                out.write_all(b":");
                canonical(&m[k.as_str()], out);
            }
            out.write_all(b"}");
        }
        Value::Array(a) => {
            out.write_all(b"[");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",");
                }
                canonical(x, out);
            }
            out.write_all(b"]");
        }
        other => {
            let _ = serde_json::to_writer(SinkWriter(out), other);
        }
    }
}

/// SplitMix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A value in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// SplitMix64: small, fast and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = (hi as i128 - lo as i128 + 1) as u128;
        (lo as i128 + (u128::from(self.next()) % span) as i128) as i64
    }

    fn chance(&mut self, p: f64) -> bool {
        unit(self.next()) < p
    }
}

const ADJECTIVES: [&str; 12] = [
    "leading",
    "emerging",
    "established",
    "regional",
    "global",
    "specialized",
    "fast-growing",
    "diversified",
    "niche",
    "mature",
    "innovative",
    "resilient",
];
const NOUNS: [&str; 12] = [
    "provider",
    "platform",
    "market",
    "segment",
    "strategy",
    "position",
    "portfolio",
    "network",
    "offering",
    "partnership",
    "presence",
    "model",
];
const CONFIDENCE: [&str; 3] = ["high", "medium", "low"];

/// The generator: a seeded stream of choices walking a schema.
struct Gen {
    rng: Rng,
    subject: String,
    /// `subject` escaped as the body of a JSON string, once: most strings written repeat it.
    subject_json: Vec<u8>,
    /// Set once the output passes [`MAX_OUTPUT_BYTES`], or a string would: what follows
    /// is not generated.
    too_big: bool,
}

/// What [`Gen::value`] wrote: an object, with the map whose keys it has (the schema's
/// `properties`, or a `const` or `enum` value; `None` for no properties), or anything else.
enum Written<'s> {
    Object(Option<&'s Map<String, Value>>),
    Other,
}

/// The keywords of a schema object that [`Gen::value`] looks at, found in one pass over its
/// keys rather than a map lookup each (string comparisons were a tenth of the sim's time).
#[derive(Default)]
struct Keywords<'s> {
    reference: Option<&'s Value>,
    constant: Option<&'s Value>,
    options: Option<&'s Value>,
    any_of: Option<&'s Value>,
    one_of: Option<&'s Value>,
    all_of: Option<&'s Value>,
    ty: Option<&'s Value>,
    properties: Option<&'s Value>,
    items: Option<&'s Value>,
    min_items: Option<&'s Value>,
    max_items: Option<&'s Value>,
}

impl<'s> Keywords<'s> {
    fn of(obj: &'s Map<String, Value>) -> Keywords<'s> {
        let mut k = Keywords::default();
        for (key, v) in obj {
            let slot = match key.as_str() {
                "$ref" => &mut k.reference,
                "const" => &mut k.constant,
                "enum" => &mut k.options,
                "anyOf" => &mut k.any_of,
                "oneOf" => &mut k.one_of,
                "allOf" => &mut k.all_of,
                "type" => &mut k.ty,
                "properties" => &mut k.properties,
                "items" => &mut k.items,
                "minItems" => &mut k.min_items,
                "maxItems" => &mut k.max_items,
                _ => continue,
            };
            *slot = Some(v);
        }
        k
    }
}

/// The `items` of an array schema that gives a tuple of none.
static NULL: Value = Value::Null;

impl Gen {
    /// Writes a value that conforms to `schema` to `out`.
    fn value<'s>(
        &mut self,
        schema: &'s Value,
        root: &'s Value,
        name: &str,
        depth: usize,
        out: &mut Vec<u8>,
    ) -> Written<'s> {
        // Past the limit nothing more is generated, whatever the schema nests or repeats
        // (objects through `$ref`s, arrays of arrays): the run fails (see `outcome_seeded`).
        self.too_big |= out.len() > MAX_OUTPUT_BYTES;
        if self.too_big {
            return write_null(out);
        }
        let Some(obj) = schema.as_object() else {
            // `true`/`{}`-like schemas accept anything; a string is always valid.
            self.write_text(name, out);
            return Written::Other;
        };
        if depth > MAX_GEN_DEPTH {
            return write_null(out);
        }
        let k = Keywords::of(obj);
        if let Some(r) = k.reference.and_then(Value::as_str) {
            return match resolve_ref(root, r) {
                Some(target) => self.value(target, root, name, depth + 1, out),
                None => write_null(out),
            };
        }
        if let Some(c) = k.constant {
            return write_copy(out, c);
        }
        if let Some(Value::Array(options)) = k.options
            && !options.is_empty()
        {
            return write_copy(out, &options[self.rng.below(options.len())]);
        }
        for alternatives in [k.any_of, k.one_of] {
            if let Some(Value::Array(branches)) = alternatives {
                let non_null: Vec<&Value> =
                    branches.iter().filter(|b| !is_null_schema(b)).collect();
                let has_null = non_null.len() < branches.len();
                if non_null.is_empty() || (has_null && self.rng.chance(0.15)) {
                    return write_null(out);
                }
                let pick = non_null[self.rng.below(non_null.len())];
                return self.value(pick, root, name, depth + 1, out);
            }
        }
        if let Some(Value::Array(parts)) = k.all_of
            && let Some(first) = parts.first()
        {
            return self.value(first, root, name, depth + 1, out);
        }
        let ty = match k.ty {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(types)) => {
                let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
                let non_null: Vec<&str> = names.iter().copied().filter(|t| *t != "null").collect();
                if non_null.is_empty() || (non_null.len() < names.len() && self.rng.chance(0.15)) {
                    return write_null(out);
                }
                non_null[self.rng.below(non_null.len())]
            }
            _ if k.properties.is_some() => "object",
            _ if k.items.is_some() => "array",
            _ => "string",
        };
        match ty {
            "object" => {
                let props = match k.properties {
                    Some(Value::Object(props)) => Some(props),
                    _ => None,
                };
                out.push(b'{');
                for (i, (key, sub)) in props.into_iter().flatten().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, key);
                    out.push(b':');
                    self.value(sub, root, key, depth + 1, out);
                }
                out.push(b'}');
                return Written::Object(props);
            }
            "array" => {
                let string_items;
                let items = match k.items {
                    Some(Value::Array(tuple)) => tuple.first().unwrap_or(&NULL),
                    Some(s) => s,
                    None => {
                        string_items = json!({"type": "string"});
                        &string_items
                    }
                };
                let min = k.min_items.and_then(Value::as_u64).unwrap_or(1) as i64;
                let max = k
                    .max_items
                    .and_then(Value::as_u64)
                    .map_or(min.max(1) + 2, |m| m as i64);
                let n = self.rng.range(min.min(max), max.max(min.min(max)));
                let item_name = singular(name);
                out.push(b'[');
                for i in 0..n {
                    if self.too_big {
                        break;
                    }
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(items, root, &item_name, depth + 1, out);
                }
                out.push(b']');
            }
            "integer" => {
                let (lo, hi) = bounds(obj, name);
                write_value(out, &self.rng.range(lo.ceil() as i64, hi.floor() as i64));
            }
            "number" => {
                let (lo, hi) = bounds(obj, name);
                let x = lo + unit(self.rng.next()) * (hi - lo);
                // Not finite: `null`, as serde_json writes it.
                write_value(out, &((x * 100.0).round() / 100.0).clamp(lo, hi));
            }
            "boolean" => write_value(out, &self.rng.chance(0.5)),
            "null" => return write_null(out),
            _ => self.string(obj, name, out),
        }
        Written::Other
    }

    /// Writes a string for a string schema: a value of its `format` when the sim knows the
    /// format, else a phrase about the subject; cut or padded to its length bounds.
    fn string(&mut self, obj: &Map<String, Value>, name: &str, out: &mut Vec<u8>) {
        let formatted = obj
            .get("format")
            .and_then(Value::as_str)
            .and_then(|f| self.formatted(f));
        let s = match formatted {
            Some(s) => s,
            // The usual case: no bounds, so the phrase goes straight into the output.
            None if !obj.contains_key("maxLength") && !obj.contains_key("minLength") => {
                return self.write_text(name, out);
            }
            None => self.text(name),
        };
        let s = match fit_length(s, obj) {
            Ok(s) => s,
            Err(s) => {
                self.too_big = true;
                s
            }
        };
        write_str(out, &s);
    }

    /// A value of a string `format` the sim knows; `None`, choosing nothing, for another.
    fn formatted(&mut self, format: &str) -> Option<String> {
        Some(match format {
            "date" => self.date(),
            "date-time" => format!(
                "{}T{:02}:{:02}:{:02}Z",
                self.date(),
                self.rng.below(24),
                self.rng.below(60),
                self.rng.below(60)
            ),
            "time" => format!("{:02}:{:02}:00", self.rng.below(24), self.rng.below(60)),
            "email" => format!("contact{}@example.com", self.rng.below(1000)),
            "uri" | "url" => format!("https://example.com/{}", self.rng.next() % 100_000),
            "uuid" => {
                let (a, b) = (self.rng.next(), self.rng.next());
                format!(
                    "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    b >> 52,
                    b & 0xffff_ffff_ffff
                )
            }
            _ => return None,
        })
    }

    fn date(&mut self) -> String {
        format!(
            "{}-{:02}-{:02}",
            self.rng.range(1990, 2025),
            self.rng.range(1, 12),
            self.rng.range(1, 28)
        )
    }

    fn text(&mut self, name: &str) -> String {
        let mut json = Vec::with_capacity(128);
        self.write_text(name, &mut json);
        serde_json::from_slice(&json).expect("the sim writes JSON strings")
    }

    /// Writes, as a JSON string, a phrase about the subject for a string named `name`
    /// (its `_`s read as spaces). Written byte by byte rather than formatted: formatting
    /// was a fifth of the sim's time.
    fn write_text(&mut self, name: &str, out: &mut Vec<u8>) {
        let adjective = ADJECTIVES[self.rng.below(ADJECTIVES.len())].as_bytes();
        let noun = NOUNS[self.rng.below(NOUNS.len())].as_bytes();
        let tag = self.rng.next() & 0xffff;
        // The words are lower-case ASCII, with nothing to escape (a test checks).
        out.push(b'"');
        out.push(adjective[0].to_ascii_uppercase());
        out.extend_from_slice(&adjective[1..]);
        out.push(b' ');
        out.extend_from_slice(noun);
        out.extend_from_slice(b" (");
        let at = out.len();
        escape_into(out, name.as_bytes());
        for b in &mut out[at..] {
            if *b == b'_' {
                *b = b' ';
            }
        }
        out.extend_from_slice(b" of ");
        out.extend_from_slice(&self.subject_json);
        out.extend_from_slice(b", #");
        push_hex(out, tag, 4);
        out.extend_from_slice(b")\"");
    }

    fn paragraph(&mut self, description: Option<&str>) -> String {
        let mut s = format!(
            "Simulated report on: {}",
            self.subject.trim_end_matches('.')
        );
        s.push('.');
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            let _ = write!(s, " Asked for: {d}.");
        }
        for _ in 0..3 {
            let (a1, a2) = (
                ADJECTIVES[self.rng.below(ADJECTIVES.len())],
                ADJECTIVES[self.rng.below(ADJECTIVES.len())],
            );
            let _ = write!(
                s,
                " It is {} {a1} {} with {} {a2} {}.",
                article(a1),
                NOUNS[self.rng.below(NOUNS.len())],
                article(a2),
                NOUNS[self.rng.below(NOUNS.len())]
            );
        }
        s
    }

    /// Writes `,"basis":[…]`: one entry per field of an object, else one for `output`.
    fn basis(&mut self, content: Written<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(br#","basis":["#);
        match content {
            Written::Object(fields) => {
                for (i, field) in fields.into_iter().flat_map(Map::keys).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.field_basis(field, out);
                }
            }
            Written::Other => self.field_basis("output", out),
        }
        out.push(b']');
    }

    /// Writes one [`FieldBasis`](crate::api::FieldBasis) with one or two citations.
    fn field_basis(&mut self, field: &str, out: &mut Vec<u8>) {
        let subject = &self.subject_json;
        out.extend_from_slice(br#"{"field":"#);
        write_str(out, field);
        out.extend_from_slice(br#","reasoning":"Simulated: `"#);
        escape_into(out, field.as_bytes());
        out.extend_from_slice(b"` was derived deterministically from the input about ");
        out.extend_from_slice(subject);
        out.extend_from_slice(br#".","citations":["#);
        let n = 1 + self.rng.below(2);
        for i in 0..n {
            if i > 0 {
                out.push(b',');
            }
            let id = self.rng.next() & 0xffff_ffff;
            out.extend_from_slice(br#"{"url":"https://example.com/sim/"#);
            push_hex(out, id, 8);
            out.extend_from_slice(br#"","title":"Simulated source "#);
            out.push(b'1' + i as u8);
            out.extend_from_slice(b" on ");
            out.extend_from_slice(subject);
            out.extend_from_slice(br#"","excerpts":["An excerpt about "#);
            out.extend_from_slice(subject);
            out.extend_from_slice(b" supporting ");
            escape_into(out, field.as_bytes());
            out.extend_from_slice(br#"."]}"#);
        }
        out.extend_from_slice(br#"],"confidence":"#);
        write_str(out, CONFIDENCE[self.rng.below(CONFIDENCE.len())]);
        out.push(b'}');
    }
}

/// Writes the low `digits` hex digits of `v`, lower case, zero-padded.
fn push_hex(out: &mut Vec<u8>, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for d in (0..digits).rev() {
        out.push(HEX[((v >> (4 * d)) & 0xf) as usize]);
    }
}

/// Writes `s` as a JSON string, escaped as serde_json escapes it: `"`, `\\` and control
/// characters, the usual five by letter and the rest as `\u00xx`.
fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escape_into(out, s.as_bytes());
    out.push(b'"');
}

/// Whether a byte is escaped in a JSON string.
fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any of the eight bytes of `w` is escaped in a JSON string (without looking at
/// them one by one: a byte below 0x20, or equal to `"` or `\\`, leaves its high bit set in
/// one of the three terms).
fn any_escaped(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = w.wrapping_sub(ONES * 0x20) & !w;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    (below | quote | backslash) & HIGH != 0
}

/// The body of a JSON string: `bytes` escaped (see [`write_str`]). The generated text has
/// almost nothing to escape, so it is scanned a word at a time and copied in runs: the
/// byte-by-byte loop this replaces was 38% of the sim's time.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    while let Some(i) = next_escaped(bytes, start) {
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        let b = bytes[i];
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x09 => b't',
            0x0a => b'n',
            0x0c => b'f',
            0x0d => b'r',
            _ => b'u',
        };
        if short == b'u' {
            out.extend_from_slice(b"\\u00");
            push_hex(out, u64::from(b), 2);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The first byte at or after `from` that is escaped: eight bytes at a time, then one by
/// one in the word that has it (or in the last few bytes).
fn next_escaped(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if any_escaped(w) {
            break;
        }
        i += 8;
    }
    bytes[i..].iter().position(|&b| escaped(b)).map(|p| i + p)
}

/// Writes a value as serde_json does (an `f64` that is not finite as `null`).
fn write_value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
}

fn write_null(out: &mut Vec<u8>) -> Written<'static> {
    out.extend_from_slice(b"null");
    Written::Other
}

/// Writes a `const` or `enum` value from the schema.
fn write_copy<'s>(out: &mut Vec<u8>, v: &'s Value) -> Written<'s> {
    write_value(out, v);
    match v {
        Value::Object(m) => Written::Object(Some(m)),
        _ => Written::Other,
    }
}

fn is_null_schema(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("null")
}

/// Resolves a local `$ref` (`#/$defs/X`, `#/definitions/X`, any JSON pointer into the root).
pub(crate) fn resolve_ref<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    if pointer.is_empty() {
        return Some(root);
    }
    root.pointer(pointer)
}

/// Numeric bounds of a schema; plausible defaults (years for `*year*` fields) when unset.
fn bounds(obj: &Map<String, Value>, name: &str) -> (f64, f64) {
    let year = name
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"year"));
    let (dlo, dhi) = if year {
        (1950.0, 2024.0)
    } else {
        (0.0, 1000.0)
    };
    let get = |k: &str| obj.get(k).and_then(Value::as_f64);
    let lo = get("minimum")
        .or_else(|| get("exclusiveMinimum").map(|x| x + 1.0))
        .unwrap_or(dlo);
    let hi = get("maximum")
        .or_else(|| get("exclusiveMaximum").map(|x| x - 1.0))
        .unwrap_or(if lo > dhi { lo + 1000.0 } else { dhi });
    if hi < lo { (lo, lo) } else { (lo, hi) }
}

/// `s` cut to `maxLength` and padded to `minLength`; unpadded, as an error, when
/// `minLength` passes [`MAX_OUTPUT_BYTES`].
fn fit_length(mut s: String, obj: &Map<String, Value>) -> Result<String, String> {
    if let Some(max) = obj.get("maxLength").and_then(Value::as_u64) {
        s = s.chars().take(max as usize).collect();
    }
    if let Some(min) = obj.get("minLength").and_then(Value::as_u64) {
        if min > MAX_OUTPUT_BYTES as u64 {
            return Err(s);
        }
        let short = min.saturating_sub(s.chars().count() as u64);
        s.extend(std::iter::repeat_n('x', short as usize));
    }
    Ok(s)
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn singular(name: &str) -> String {
    name.strip_suffix('s').unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(input: Value, spec: Option<TaskSpec>) -> Job {
        Job {
            processor: "core".into(),
            input,
            spec: spec.map(std::sync::Arc::new),
        }
    }

    fn json_spec(schema: Value) -> Option<TaskSpec> {
        Some(TaskSpec {
            output_schema: Schema::Json {
                json_schema: schema,
            },
            input_schema: None,
        })
    }

    fn check(schema: &Value, root: &Value, v: &Value, path: &str) {
        let obj = schema.as_object().unwrap();
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            return check(resolve_ref(root, r).unwrap(), root, v, path);
        }
        if let Some(Value::Array(opts)) = obj.get("enum") {
            assert!(opts.contains(v), "{path}: {v} not in enum");
            return;
        }
        if let Some(Value::Array(branches)) = obj.get("anyOf") {
            if v.is_null() {
                assert!(
                    branches.iter().any(is_null_schema),
                    "{path}: null not allowed"
                );
                return;
            }
            let non_null: Vec<_> = branches.iter().filter(|b| !is_null_schema(b)).collect();
            return check(non_null[0], root, v, path);
        }
        let types: Vec<&str> = match obj.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec!["string"],
        };
        if v.is_null() {
            assert!(types.contains(&"null"), "{path}: null for {types:?}");
            return;
        }
        let ty = types.iter().copied().find(|t| *t != "null").unwrap();
        match ty {
            "object" => {
                let m = v
                    .as_object()
                    .unwrap_or_else(|| panic!("{path}: not an object"));
                let props = obj["properties"].as_object().unwrap();
                for req in obj
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        m.contains_key(req.as_str().unwrap()),
                        "{path}: missing {req}"
                    );
                }
                for (k, sub) in props {
                    check(sub, root, &m[k], &format!("{path}.{k}"));
                }
            }
            "array" => {
                let a = v
                    .as_array()
                    .unwrap_or_else(|| panic!("{path}: not an array"));
                if let Some(min) = obj.get("minItems").and_then(Value::as_u64) {
                    assert!(a.len() as u64 >= min, "{path}: too few items");
                }
                if let Some(max) = obj.get("maxItems").and_then(Value::as_u64) {
                    assert!(a.len() as u64 <= max, "{path}: too many items");
                }
                for (i, x) in a.iter().enumerate() {
                    check(&obj["items"], root, x, &format!("{path}[{i}]"));
                }
            }
            "integer" => {
                let n = v
                    .as_i64()
                    .unwrap_or_else(|| panic!("{path}: {v} not an integer"));
                if let Some(min) = obj.get("minimum").and_then(Value::as_i64) {
                    assert!(n >= min, "{path}: {n} < {min}");
                }
                if let Some(max) = obj.get("maximum").and_then(Value::as_i64) {
                    assert!(n <= max, "{path}: {n} > {max}");
                }
            }
            "number" => {
                let x = v
                    .as_f64()
                    .unwrap_or_else(|| panic!("{path}: {v} not a number"));
                if let Some(min) = obj.get("minimum").and_then(Value::as_f64) {
                    assert!(x >= min, "{path}: {x} < {min}");
                }
                if let Some(max) = obj.get("maximum").and_then(Value::as_f64) {
                    assert!(x <= max, "{path}: {x} > {max}");
                }
            }
            "boolean" => assert!(v.is_boolean(), "{path}: not a boolean"),
            "string" => {
                let s = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{path}: {v} not a string"));
                match obj.get("format").and_then(Value::as_str) {
                    Some("date") => {
                        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                            .unwrap_or_else(|e| panic!("{path}: {s}: {e}"));
                    }
                    Some("date-time") => {
                        chrono::DateTime::parse_from_rfc3339(s)
                            .unwrap_or_else(|e| panic!("{path}: {s}: {e}"));
                    }
                    _ => {}
                }
            }
            other => panic!("{path}: unexpected type {other}"),
        }
    }

    fn rich_schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "founded": {"type": "string", "format": "date"},
                "updated": {"type": "string", "format": "date-time"},
                "revenue": {"type": "number", "minimum": 0, "maximum": 10},
                "founded_year": {"type": "integer"},
                "employees": {"type": "integer", "minimum": 5, "maximum": 9},
                "public": {"type": "boolean"},
                "tier": {"type": "string", "enum": ["gold", "silver"]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
                "hq": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "geo": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}
                    },
                    "required": ["city", "geo"]
                },
                "ceo": {"type": ["string", "null"]},
                "parent": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "owner": {"$ref": "#/$defs/Owner"}
            },
            "required": ["name", "founded", "revenue", "tags", "hq"],
            "$defs": {"Owner": {"type": "object", "properties": {"share": {"type": "number"}}}}
        })
    }

    #[test]
    fn outputs_conform_to_the_schema_for_many_inputs() {
        let schema = rich_schema();
        let sim = Sim::default();
        let mut saw_null = false;
        for i in 0..300 {
            let out = sim
                .outcome(&job(
                    json!({"company": format!("Co {i}")}),
                    json_spec(schema.clone()),
                ))
                .unwrap();
            let TaskRunOutput::Json { content, basis, .. } = out else {
                panic!("json schema gives json output")
            };
            check(&schema, &schema, &content, "$");
            saw_null |= content["ceo"].is_null() || content["parent"].is_null();
            let fields: Vec<&str> = basis.iter().map(|b| b.field.as_str()).collect();
            let keys: Vec<&str> = content
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(fields, keys, "one basis entry per top-level field");
            for b in &basis {
                assert!(!b.citations.is_empty() && b.confidence.is_some());
                assert!(
                    b.citations[0]
                        .excerpts
                        .as_ref()
                        .is_some_and(|e| !e.is_empty())
                );
            }
        }
        assert!(saw_null, "nullable fields are sometimes null");
    }

    #[test]
    fn a_schema_asking_for_a_huge_output_fails_the_run_at_once() {
        let sim = Sim::default();
        let huge = [
            json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 1_000_000_000_000u64}}}),
            json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000_000u64}}}),
            json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 1000,
                "items": {"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000}}}}}),
            // No array at all: ten properties at each level, as deep as `$ref`s are followed
            // (10.8 MB of output before the limit moved into `Gen::value`).
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/L"}},
                "$defs": {"L": {"type": "object", "properties": {
                    "p0": {"$ref": "#/$defs/L"}, "p1": {"$ref": "#/$defs/L"}, "p2": {"$ref": "#/$defs/L"},
                    "p3": {"$ref": "#/$defs/L"}, "p4": {"$ref": "#/$defs/L"}, "p5": {"$ref": "#/$defs/L"},
                    "p6": {"$ref": "#/$defs/L"}, "p7": {"$ref": "#/$defs/L"}, "p8": {"$ref": "#/$defs/L"},
                    "p9": {"$ref": "#/$defs/L"}}}}}),
        ];
        for schema in huge {
            let failure = sim
                .outcome(&job(json!({"company": "Co"}), json_spec(schema.clone())))
                .expect_err("no output");
            assert!(
                failure
                    .message
                    .contains("more than the sim processor writes (4 MiB at most)"),
                "{schema}: {}",
                failure.message
            );
        }
        // Right under the limit the run still completes, padded as asked.
        let big = json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 4_000_000}}});
        let out = sim
            .outcome(&job(json!({"company": "Co"}), json_spec(big)))
            .unwrap();
        let TaskRunOutput::Json { content, .. } = out else {
            panic!("json schema gives json output")
        };
        assert_eq!(content["s"].as_str().unwrap().len(), 4_000_000);
    }

    #[test]
    fn same_input_same_output_and_key_order_does_not_matter() {
        let sim = Sim::default();
        let spec = json_spec(rich_schema());
        let a = sim
            .outcome(&job(json!({"a": "x", "b": 1}), spec.clone()))
            .unwrap();
        let b = sim
            .outcome(&job(json!({"b": 1, "a": "x"}), spec.clone()))
            .unwrap();
        assert_eq!(a, b);
        let c = sim.outcome(&job(json!({"a": "y", "b": 1}), spec)).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn text_and_auto_schemas() {
        let sim = Sim::default();
        let text = Some(TaskSpec {
            output_schema: Schema::Text {
                description: Some("a summary".into()),
            },
            input_schema: None,
        });
        let TaskRunOutput::Text { content, basis, .. } =
            sim.outcome(&job(json!("Acme"), text)).unwrap()
        else {
            panic!("text schema gives text output")
        };
        assert!(content.contains("Acme"));
        assert_eq!(basis.len(), 1);
        assert_eq!(basis[0].field, "output");
        let TaskRunOutput::Json {
            content,
            output_schema: Some(schema),
            ..
        } = sim.outcome(&job(json!("Acme"), None)).unwrap()
        else {
            panic!("auto schema gives json output with its schema")
        };
        check(&schema, &schema, &content, "$");
    }

    #[test]
    fn runs_without_latency_are_done_at_once_and_the_same() {
        let instant = Sim::default();
        let slow = Sim::new(SimConfig {
            latency: Duration::from_millis(5)..=Duration::from_millis(5),
            failure_rate: 0.0,
        });
        let j = job(json!({"name": "Acme"}), json_spec(rich_schema()));
        let now = instant.process_now(&j).expect("no latency: done at once");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert_eq!(now, rt.block_on(instant.process(&j)));
        assert!(slow.process_now(&j).is_none(), "a run with latency waits");
        assert_eq!(now, rt.block_on(slow.process(&j)));
    }

    #[test]
    fn failure_rate_and_latency_are_deterministic_per_input() {
        let sim = Sim::new(SimConfig {
            latency: Duration::from_millis(1000)..=Duration::from_millis(3000),
            failure_rate: 0.3,
        });
        let mut failed = 0;
        for i in 0..1000 {
            let j = job(json!({"i": i}), None);
            let first = sim.outcome(&j);
            assert_eq!(first.is_err(), sim.outcome(&j).is_err());
            if let Err(e) = first {
                assert!(e.message.contains("Simulated failure"));
                failed += 1;
            }
            let seed = Sim::seed(&j.input, None);
            let l = sim.latency(seed);
            assert_eq!(l, sim.latency(seed));
            assert!(l >= Duration::from_millis(1000) && l <= Duration::from_millis(3000));
        }
        assert!(
            (200..400).contains(&failed),
            "{failed} of 1000 failed at rate 0.3"
        );
        let never = Sim::default();
        assert!((0..100).all(|i| !never.fails(Sim::seed(&json!(i), None))));
    }

    /// The seed as first defined: FNV-1a over a canonical string built with `to_string`.
    fn reference_seed(input: &Value, spec: Option<&TaskSpec>) -> u64 {
        fn canon(v: &Value, out: &mut String) {
            match v {
                Value::Object(m) => {
                    let mut keys: Vec<&String> = m.keys().collect();
                    keys.sort();
                    out.push('{');
                    for (i, k) in keys.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&Value::from(k.as_str()).to_string());
                        out.push(':');
                        canon(&m[k.as_str()], out);
                    }
                    out.push('}');
                }
                Value::Array(a) => {
                    out.push('[');
                    for (i, x) in a.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        canon(x, out);
                    }
                    out.push(']');
                }
                other => out.push_str(&other.to_string()),
            }
        }
        let mut text = String::new();
        canon(input, &mut text);
        text.push('\u{1}');
        if let Some(spec) = spec {
            canon(&serde_json::to_value(spec).unwrap(), &mut text);
        }
        let mut h = Fnv::default();
        h.write_all(text.as_bytes());
        h.0
    }

    /// A schema with every construct the generator handles.
    const EVERY_BRANCH: &str = r##"{
    "type": "object",
    "properties": {
        "founded": {"type": "string", "format": "date"},
        "updated": {"type": "string", "format": "date-time"},
        "opens": {"type": "string", "format": "time"},
        "email": {"type": "string", "format": "email"},
        "site": {"type": "string", "format": "uri"},
        "link": {"type": "string", "format": "url"},
        "id": {"type": "string", "format": "uuid"},
        "short": {"type": "string", "maxLength": 5},
        "padded": {"type": "string", "minLength": 90},
        "revenue": {"type": "number", "minimum": 0, "maximum": 10},
        "margin": {"type": "number", "exclusiveMinimum": -5, "exclusiveMaximum": 5},
        "big": {"type": "number", "minimum": 5000},
        "odd": {"type": "number", "minimum": 3, "maximum": 1},
        "year_built": {"type": "integer"},
        "staff": {"type": "integer", "minimum": 5, "maximum": 9},
        "public": {"type": "boolean"},
        "nothing": {"type": "null"},
        "tier": {"enum": ["gold", "silver", {"k": 1}]},
        "fixed": {"const": {"z": [1, 2], "a": "\"q\""}},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
        "pair": {"type": "array", "items": [{"type": "integer"}, {"type": "string"}]},
        "bare_list": {"type": "array"},
        "implied_list": {"items": {"type": "boolean"}},
        "implied_obj": {"properties": {"x": {"type": "integer"}}},
        "anything": true,
        "untyped": {},
        "ceo": {"type": ["string", "null"]},
        "only_null": {"type": ["null"]},
        "parent": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "kind": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        "never": {"anyOf": [{"type": "null"}]},
        "merged": {"allOf": [{"type": "object", "properties": {"m": {"type": "string"}}}]},
        "owner": {"$ref": "#/$defs/Owner"},
        "tree": {"$ref": "#/$defs/Node"},
        "lost": {"$ref": "#/$defs/Missing"},
        "a\"\u00e9\n": {"type": "string"}
    },
    "$defs": {
        "Owner": {"type": "object", "properties": {"share": {"type": "number"}}},
        "Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}
    }
}"##;

    /// Schemas and inputs whose outputs [`GOLDEN`] pins, byte for byte: every branch of
    /// the generator, strings that need escaping, each kind of spec.
    fn golden_cases() -> Vec<(Value, Option<TaskSpec>)> {
        let text = |description: Option<&str>| {
            Some(TaskSpec {
                output_schema: Schema::Text {
                    description: description.map(str::to_string),
                },
                input_schema: None,
            })
        };
        let company = json_spec(json!({
            "type": "object",
            "properties": {
                "ceo_name": {"type": "string", "description": "Name of the current CEO"},
                "founded_year": {"type": "integer"},
                "headquarters": {"type": "string"},
                "employee_count": {"type": "integer"},
                "key_insights": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["ceo_name", "founded_year", "headquarters", "employee_count", "key_insights"]
        }));
        let every_branch = json_spec(serde_json::from_str(EVERY_BRANCH).unwrap());
        let inputs = [
            json!({"name": "Company 7", "website": "https://company-7.example", "country": "US"}),
            json!({"name": "Acme \"Inc\"\n\u{1}\u{e9}\t\\", "n": 1.5, "z": [1, null, true]}),
            json!({"n": 3, "note": "a subject much longer than sixty characters, which the simulator cuts short"}),
            json!({}),
            json!("plain text input"),
            json!(42),
        ];
        let specs = [
            company,
            every_branch,
            json_spec(json!({"type": "string", "format": "date"})),
            json_spec(json!({"enum": [{"b": 1, "a": 2}]})),
            json_spec(json!(true)),
            text(Some("a \"short\" summary")),
            text(None),
            None,
        ];
        let mut cases = Vec::new();
        for spec in &specs {
            for input in &inputs {
                cases.push((input.clone(), spec.clone()));
            }
        }
        cases
    }

    /// FNV-1a and length of the output of each of [`golden_cases`], as the
    /// generator gave them when it built a `Value` and serialized it (before it wrote JSON
    /// as it went): outputs stay the same from one version to the next.
    #[rustfmt::skip]
    const GOLDEN: [(u64, usize); 48] = [
        (0xe352d70ecb05505a, 2264),
        (0xbf249189afaa17b5, 3030),
        (0x5ae090dc8c509c58, 3522),
        (0xa51faad245701230, 2669),
        (0x1bef810f597e6912, 2420),
        (0xf93fb47e900a14cb, 2311),
        (0xfa4aae49e407aea0, 13033),
        (0x12d74d778d17a268, 17014),
        (0x09bbafb13493523b, 22791),
        (0x16328a0fed95a02a, 14694),
        (0xe86cc50ac424a619, 15600),
        (0x1aa82d55c2e28812, 13062),
        (0x60728ba1e4c3a96f, 454),
        (0x73a4ba466d28dfa1, 574),
        (0x7e9cfe2e0a5959a9, 746),
        (0x423ebb8662b4a09c, 343),
        (0x581e401d4e9769c1, 526),
        (0xd490230a0c106172, 321),
        (0x46a802ff94a565c3, 694),
        (0x5265ffca7f36fb0e, 1062),
        (0x18230d32915f5224, 1403),
        (0x336f1d4bfa98b2ca, 752),
        (0x14cec3ca25349186, 961),
        (0x676cdd9275031fec, 568),
        (0xebcc04e0bbb8d647, 348),
        (0xe5ac634e4f82d3d1, 451),
        (0x44bd8288055cff2d, 830),
        (0x337e3f6480d31860, 522),
        (0x5c5efbda829fc1f0, 563),
        (0x905e2d7150b7b2ee, 484),
        (0x676408b656f1cc2c, 661),
        (0xe0942087cf9fa278, 814),
        (0x35b22d8e24802554, 769),
        (0xac342ef47abbf60f, 693),
        (0xa3b6268fd20dda15, 578),
        (0xefb4e89e3c396a9c, 674),
        (0xd663ff2772346dda, 499),
        (0xe066c0b0410c261b, 771),
        (0xa152249c832e330d, 968),
        (0xd13245e245befafb, 519),
        (0x6e7eadf1ee26ffbd, 710),
        (0x6d2a5d54c42c8e30, 638),
        (0x36f2209f0a4b8460, 1528),
        (0x8b1e708219486655, 2114),
        (0x5f25edda2abfec3e, 2481),
        (0x1fde6507abb4a20f, 1564),
        (0xfdc9046463bdf169, 1553),
        (0x53fa6b1357a6da36, 1481),
    ];

    #[test]
    fn outputs_are_byte_for_byte_what_they_were_and_what_serde_writes() {
        let sim = Sim::default();
        let cases = golden_cases();
        assert_eq!(cases.len(), GOLDEN.len());
        for (i, ((input, spec), (hash, len))) in cases.into_iter().zip(GOLDEN).enumerate() {
            let job = job(input, spec);
            let text = sim
                .outcome_seeded(&job, Sim::seed(&job.input, job.spec.as_deref()))
                .unwrap();
            let mut h = Fnv::default();
            h.write_all(text.as_bytes());
            assert_eq!((h.0, text.len()), (hash, len), "case {i}: {text}");
            let parsed: TaskRunOutput = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&parsed).unwrap(), text, "case {i}");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("\u{e9}\u{2028}\u{1f600} end");
        // Each byte to escape at every offset of a word and of the short tail after it.
        let mut placed = Vec::new();
        for c in ['"', '\\', '\n', '\u{1}', '\u{1f}', '\u{7f}', '\u{e9}'] {
            for at in 0..20 {
                let mut t: String = "abcdefghijklmnopqrst".into();
                t.insert(at, c);
                placed.push(t);
            }
        }
        let fixed = [all.as_str(), "", "plain", "\"", "a\\b\u{7f}"];
        for s in fixed.into_iter().chain(placed.iter().map(String::as_str)) {
            let want = serde_json::to_string(s).unwrap();
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(String::from_utf8(out).unwrap(), want);
            // The same escaped in two pieces (as the sim writes its phrases).
            let mid = (0..=s.len() / 2)
                .rev()
                .find(|&i| s.is_char_boundary(i))
                .unwrap();
            let (head, tail) = s.split_at(mid);
            let mut out = b"\"".to_vec();
            escape_into(&mut out, head.as_bytes());
            escape_into(&mut out, tail.as_bytes());
            out.push(b'"');
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn a_hash_step_continues_any_hash_as_the_bytes_would() {
        let mut rng = Rng(7);
        for len in [0, 1, 2, 7, 64, 600] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let step = FnvStep::over(&bytes);
            for _ in 0..300 {
                let start = rng.next();
                let mut h = Fnv(start);
                h.write_all(&bytes);
                assert_eq!(step.apply(start), h.0, "{len} bytes from {start:x}");
            }
        }
    }

    #[test]
    fn phrase_words_are_written_as_they_are() {
        // `Gen::write_text` copies them unescaped and upper-cases the first byte.
        for w in ADJECTIVES.iter().chain(&NOUNS).chain(&CONFIDENCE) {
            assert!(
                w.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{w}"
            );
        }
    }

    #[test]
    fn the_word_test_finds_exactly_the_bytes_to_escape() {
        // Every byte value at every position of a word of harmless bytes, and every pair
        // of neighbours (where a borrow between bytes would show).
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut w = *b"abcdefgh";
                w[at] = b;
                assert_eq!(
                    any_escaped(u64::from_le_bytes(w)),
                    escaped(b),
                    "{b:#x} at {at}"
                );
            }
            for c in 0..=255u8 {
                for at in 0..7 {
                    let mut w = [b'~'; 8];
                    w[at] = b;
                    w[at + 1] = c;
                    let want = escaped(b) || escaped(c);
                    assert_eq!(
                        any_escaped(u64::from_le_bytes(w)),
                        want,
                        "{b:#x} {c:#x} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn seeds_are_stable_and_the_spec_cache_changes_nothing() {
        let sim = Sim::default();
        let spec = std::sync::Arc::new(json_spec(rich_schema()).unwrap());
        let other = std::sync::Arc::new(
            json_spec(json!({"type": "object",
            "properties": {"a\"\u{e9}\n": {"type": "string"}}}))
            .unwrap(),
        );
        let inputs = [
            json!({"name": "Acme \"Inc\"", "n": 1.5, "z": [1, null, true], "a": {"y": "\u{1}é"}}),
            json!("plain text"),
            json!({}),
        ];
        // The same spec in a new `Arc` (another batch of runs) reuses the cached step.
        let again = std::sync::Arc::new((*spec).clone());
        for input in &inputs {
            for s in [&spec, &other, &spec, &again, &spec] {
                let want = reference_seed(input, Some(s));
                assert_eq!(Sim::seed(input, Some(s)), want);
                assert_eq!(sim.seed_cached(input, Some(s)), want);
            }
            assert_eq!(sim.seed_cached(input, None), reference_seed(input, None));
        }
    }
}

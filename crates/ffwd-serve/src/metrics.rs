//! Prometheus metrics: request counts by route and status, latency and batch-size
//! histograms, generated tokens and their rate, and per-model routing usage (leaves of trees,
//! experts of mixtures).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Upper bounds of the batch-size histogram's buckets.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch: BTreeMap<String, Histogram>,
    tokens: BTreeMap<String, u64>,
    /// (tokens, seconds) of the current rate window per model, and the last rate.
    rate: BTreeMap<String, (u64, Instant, f64)>,
    usage: BTreeMap<String, (&'static str, Vec<u64>)>,
}

/// The server's metrics (one lock; every update is a few additions).
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g);
        }
    }

    /// One answered request.
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests.entry((route.to_string(), status)).or_default() += 1;
            m.latency.entry(route.to_string()).or_default().observe(&LATENCY_BUCKETS, seconds);
        });
    }

    /// One model call of `rows` rows (a classifier batch or an LM decoding step).
    pub fn batch(&self, model: &str, rows: usize) {
        self.with(|m| m.batch.entry(model.to_string()).or_default().observe(&BATCH_BUCKETS, rows as f64));
    }

    /// `n` generated tokens; the rate gauge is updated over windows of at least a second.
    pub fn tokens(&self, model: &str, n: usize) {
        self.with(|m| {
            *m.tokens.entry(model.to_string()).or_default() += n as u64;
            let now = Instant::now();
            let w = m.rate.entry(model.to_string()).or_insert((0, now, 0.0));
            w.0 += n as u64;
            let dt = now.duration_since(w.1).as_secs_f64();
            if dt >= 1.0 {
                *w = (0, now, w.0 as f64 / dt);
            }
        });
    }

    /// Adds routing counts (`what` is `leaf` or `expert`) of one model call.
    pub fn usage(&self, model: &str, what: &'static str, counts: &[u64]) {
        self.with(|m| {
            let e = m.usage.entry(model.to_string()).or_insert_with(|| (what, vec![0; counts.len()]));
            if e.1.len() == counts.len() {
                e.1.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(m) = self.inner.lock() else { return out };
        out += "# HELP ffwd_requests_total Requests answered, by route and HTTP status.\n# TYPE ffwd_requests_total counter\n";
        for ((route, status), n) in &m.requests {
            let _ = writeln!(out, "ffwd_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        out += "# HELP ffwd_request_duration_seconds Time from request to the response head (for streams: to the start of the stream).\n# TYPE ffwd_request_duration_seconds histogram\n";
        for (route, h) in &m.latency {
            h.render(&mut out, "ffwd_request_duration_seconds", &format!("route=\"{route}\""), &LATENCY_BUCKETS);
        }
        out += "# HELP ffwd_batch_size Rows per model call (classifier batches, LM decoding steps).\n# TYPE ffwd_batch_size histogram\n";
        for (model, h) in &m.batch {
            h.render(&mut out, "ffwd_batch_size", &format!("model=\"{model}\""), &BATCH_BUCKETS);
        }
        out += "# HELP ffwd_generated_tokens_total Tokens generated.\n# TYPE ffwd_generated_tokens_total counter\n";
        for (model, n) in &m.tokens {
            let _ = writeln!(out, "ffwd_generated_tokens_total{{model=\"{model}\"}} {n}");
        }
        out += "# HELP ffwd_tokens_per_second Generation rate over the last window of a second or more.\n# TYPE ffwd_tokens_per_second gauge\n";
        for (model, (_, _, rate)) in &m.rate {
            let _ = writeln!(out, "ffwd_tokens_per_second{{model=\"{model}\"}} {rate}");
        }
        out += "# HELP ffwd_route_usage_total Samples routed to each leaf (trees) or expert (mixtures).\n# TYPE ffwd_route_usage_total counter\n";
        for (model, (what, counts)) in &m.usage {
            for (i, c) in counts.iter().enumerate() {
                let _ = writeln!(out, "ffwd_route_usage_total{{model=\"{model}\",{what}=\"{i}\"}} {c}");
            }
        }
        out
    }
}

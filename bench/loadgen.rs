//! Load generator for `ffwd serve` (loopback only; bounded in requests and time; stops by
//! itself). Each of `--concurrency` workers keeps one HTTP/1.1 keep-alive connection and sends
//! requests back to back; prints one JSON line: requests/s, p50/p99 latency, failures, and for
//! completions the aggregate tokens/s.
//!
//! ```sh
//! ffwd serve --model dense=mnist-dense.safetensors --port 8080 &
//! cargo run --release -p ffwd-serve --bin ffwd-loadgen -- --addr 127.0.0.1:8080 --model dense --width 784 --concurrency 64 --seconds 5
//! cargo run --release -p ffwd-serve --bin ffwd-loadgen -- --addr 127.0.0.1:8080 --model lm --completions --max-tokens 200 --concurrency 8
//! ```
//! `bench/serve.sh` runs the whole comparison (with and without dynamic batching).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Args {
    addr: SocketAddr,
    model: String,
    width: usize,
    rows: usize,
    concurrency: usize,
    requests: usize,
    seconds: f64,
    completions: bool,
    max_tokens: usize,
    /// Send rows as a raw little-endian f32 body instead of JSON.
    raw: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:8080".parse().map_err(|e| format!("{e}"))?,
        model: String::new(),
        width: 784,
        rows: 1,
        concurrency: 1,
        requests: 200_000,
        seconds: 5.0,
        completions: false,
        max_tokens: 100,
        raw: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--completions" || flag == "--raw" {
            a.completions |= flag == "--completions";
            a.raw |= flag == "--raw";
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--addr" => a.addr = v.parse().map_err(|_| format!("--addr: `{v}` is not host:port"))?,
            "--model" => a.model = v,
            "--width" => a.width = num(&v)?,
            "--rows" => a.rows = num(&v)?.max(1),
            "--concurrency" => a.concurrency = num(&v)?.max(1),
            "--requests" => a.requests = num(&v)?.max(1),
            "--seconds" => a.seconds = v.parse().map_err(|_| format!("--seconds: `{v}` is not a number"))?,
            "--max-tokens" => a.max_tokens = num(&v)?,
            _ => {
                return Err(format!("unknown flag {flag} (--addr --model --width --rows --concurrency --requests --seconds --completions --max-tokens --raw)"))
            }
        }
    }
    if !a.addr.ip().is_loopback() {
        return Err(format!("{}: the load generator only targets loopback addresses", a.addr));
    }
    Ok(a)
}

/// Reads one HTTP response from a keep-alive connection; returns (status, body).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if size == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            r.read_exact(&mut body[start..])?;
            body.truncate(start + size);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok((status, body))
}

struct Outcome {
    latencies: Vec<f64>,
    failures: usize,
    tokens: usize,
}

fn worker(a: &Args, id: usize, deadline: Instant, budget: usize) -> Outcome {
    let mut out = Outcome { latencies: Vec::new(), failures: 0, tokens: 0 };
    let Ok(stream) = TcpStream::connect(a.addr) else {
        out.failures += 1;
        return out;
    };
    let _ = stream.set_nodelay(true);
    let Ok(mut w) = stream.try_clone() else {
        out.failures += 1;
        return out;
    };
    let mut r = BufReader::new(stream);
    // a fixed pseudo-random input per worker (the server does not cache answers)
    let row: Vec<String> = (0..a.width * a.rows).map(|i| format!("{:.3}", ((i * 7919 + id * 104729) % 1000) as f32 / 1000.0)).collect();
    let rows: Vec<String> = row.chunks(a.width.max(1)).map(|c| format!("[{}]", c.join(","))).collect();
    let model = if a.model.is_empty() { String::new() } else { format!("\"model\":\"{}\",", a.model) };
    let (path, body) = if a.completions {
        ("/v1/completions", format!("{{{model}\"prompt\":\"The \",\"max_tokens\":{},\"temperature\":0.8,\"seed\":{id},\"stream\":true}}", a.max_tokens))
    } else {
        ("/v1/predict", format!("{{{model}\"inputs\":[{}]}}", rows.join(",")))
    };
    let request: Vec<u8> = if a.raw && !a.completions {
        let values: Vec<u8> = (0..a.width * a.rows).flat_map(|i| (((i * 7919 + id * 104729) % 1000) as f32 / 1000.0).to_le_bytes()).collect();
        let head = format!(
            "POST /v1/predict HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nX-Width: {}\r\nX-Model: {}\r\nContent-Length: {}\r\n\r\n",
            a.addr,
            a.width,
            a.model,
            values.len()
        );
        [head.into_bytes(), values].concat()
    } else {
        format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", a.addr, body.len()).into_bytes()
    };
    while Instant::now() < deadline && out.latencies.len() + out.failures < budget {
        let t0 = Instant::now();
        if w.write_all(&request).is_err() {
            out.failures += 1;
            break;
        }
        match read_response(&mut r) {
            Ok((200, body)) => {
                out.latencies.push(t0.elapsed().as_secs_f64());
                if a.completions {
                    out.tokens += body.windows(18).filter(|w| w == b"\"finish_reason\":nu").count();
                }
            }
            Ok(_) => out.failures += 1,
            Err(_) => {
                out.failures += 1;
                break;
            }
        }
    }
    out
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let budget = a.requests.div_ceil(a.concurrency);
    let t0 = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.concurrency)
            .map(|id| {
                s.spawn({
                    let a = &a;
                    move || worker(a, id, deadline, budget)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Outcome { latencies: Vec::new(), failures: 1, tokens: 0 })).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = outcomes.iter().flat_map(|o| o.latencies.iter().copied()).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1e3 };
    let failures: usize = outcomes.iter().map(|o| o.failures).sum();
    let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
    println!(
        "{{\"route\":\"{}\",\"body\":\"{}\",\"model\":\"{}\",\"concurrency\":{},\"rows\":{},\"requests\":{},\"failures\":{failures},\"seconds\":{wall:.3},\"requests_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"tokens_per_s\":{:.1}}}",
        if a.completions { "completions" } else { "predict" },
        if a.raw { "raw" } else { "json" },
        a.model,
        a.concurrency,
        a.rows,
        lat.len(),
        lat.len() as f64 / wall,
        pct(0.5),
        pct(0.99),
        tokens as f64 / wall
    );
}

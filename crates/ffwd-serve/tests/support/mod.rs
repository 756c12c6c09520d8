//! A server on an ephemeral loopback port, and a minimal HTTP/1.1 client (one request per
//! connection, chunked bodies decoded) to speak real HTTP to it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use ffwd::prelude::*;
use ffwd::train::backprop::Silent;
use ffwd_serve::ServeOptions;

/// A running server; dropping it stops it (gracefully) and waits.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(opts: ServeOptions) -> Server {
        let state = ffwd_serve::load(&opts).expect("models load");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            let shutdown = async {
                let _ = stop_rx.await;
            };
            rt.block_on(ffwd_serve::run(state, "127.0.0.1:0".parse().expect("addr"), move |a| addr_tx.send(a).expect("addr sent"), shutdown)).expect("serve");
        });
        let addr = addr_rx.recv().expect("server bound");
        Server { addr, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse(&raw)
}

pub fn post_json(addr: SocketAddr, path: &str, v: &serde_json::Value) -> Reply {
    request(addr, "POST", path, &[("Content-Type", "application/json")], v.to_string().as_bytes())
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(str::to_string).collect()
}

/// A quickly trained digits classifier (layer `layer`) saved under `dir`.
pub fn classifier(dir: &Path, layer: LayerKind, shape: LayerShape) -> (PathBuf, Classifier, Split) {
    let mut cfg = TrainConfig { layer, epochs: 5, ..Default::default() };
    cfg.apply_shape(&shape).expect("shape");
    let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label).expect("digits");
    let run = ffwd::spec::fit_classifier(&cfg, &split, &mut Silent).expect("train");
    let path = dir.join(format!("{}.safetensors", layer.name()));
    run.model.save(&path).expect("save");
    (path, run.model, split)
}

/// A tiny character LM trained for a few steps on a little Shakespeare, saved under `dir`.
pub fn lm(dir: &Path) -> (PathBuf, LmCheckpoint) {
    let text: String = ffwd::data::text::tiny_shakespeare().expect("text").chars().take(20_000).collect();
    let mut run = LmRunConfig::default();
    (run.model.d_model, run.model.heads, run.model.layers, run.model.context) = (16, 2, 1, 24);
    (run.train.steps, run.train.batch, run.train.seq_len, run.train.eval_every) = (20, 4, 0, 20);
    let shape = ffwd::spec::FfnShape { ffn: Some(FfnKind::Fff), ffn_width: Some(32), depth: Some(2), ..Default::default() };
    let built = ffwd::spec::lm(&run, &shape, &text).expect("lm");
    let (mut model, mut opt, mut state) = (built.lm, ffwd::optim::AdamW::new(0.0), ffwd::train::lm::LmTrainState::default());
    ffwd::train::lm::train_lm(&mut model, &built.data, &built.options, &mut opt, &mut state, None, None, &mut ffwd::train::lm::Quiet).expect("train");
    let ck = LmCheckpoint { lm: model, tokenizer: built.tokenizer, options: built.options, state, optimizer: opt };
    let path = dir.join("lm.safetensors");
    ck.save(&path).expect("save");
    let loaded = LmCheckpoint::load(&path).expect("load");
    (path, loaded)
}

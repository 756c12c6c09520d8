//! `ffwd serve` as a process: it prints where it listens, and SIGTERM lets an in-flight
//! stream finish before the process exits (0), while new connections are refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ffwd(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_ffwd")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[cfg(unix)]
#[test]
fn sigterm_drains_in_flight_streams_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let lm = dir.path().join("lm.safetensors");
    let lm = lm.to_str().unwrap();
    ffwd(&["lm", "train", "-q", "--steps", "3", "--d-model", "32", "--heads", "2", "--layers", "1", "--context", "32", "--save", lm]);
    let mut server = Command::new(env!("CARGO_BIN_EXE_ffwd"))
        .args(["serve", "--model", &format!("lm={lm}"), "--port", "0", "--max-tokens", "1000000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(server.stderr.take().unwrap());
    let mut first = String::new();
    log.read_line(&mut first).unwrap();
    let addr = first.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {first:?}")).to_string();
    // a long stream (about a second or more), read on another thread
    let a2 = addr.clone();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&a2).unwrap();
        let body = r#"{"prompt": "A", "max_tokens": 100000, "stream": true}"#;
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        String::from_utf8_lossy(&all).to_string()
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap().success());
    // new connections are refused soon after the signal, while the stream goes on
    let mut refused = false;
    while t0.elapsed() < Duration::from_secs(5) && !refused {
        refused = TcpStream::connect(&addr).is_err();
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = client.join().unwrap();
    // (chunked transfer encoding: the last event is followed by the empty chunk)
    assert!(
        text.trim_end().ends_with("data: [DONE]\n\n\r\n0"),
        "the stream was cut after {} tokens: …{}",
        text.matches("\"finish_reason\":null").count(),
        &text[text.len().saturating_sub(200)..]
    );
    assert_eq!(text.matches("\"finish_reason\":null").count(), 100_000, "every token arrived");
    let status = server.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(refused, "the listener stayed open after SIGTERM");
    let mut rest = String::new();
    log.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("POST /v1/completions 200") && rest.trim_end().ends_with("stopped"), "{rest}");
}

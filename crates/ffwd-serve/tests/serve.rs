//! The server over real HTTP on 127.0.0.1: answers equal the library's bit for bit, streams
//! equal `ffwd lm sample` (the library's generator) with the same seed, every bad input gets
//! its status and a JSON error naming the field, 64 concurrent requests get their own answers.

mod support;

use std::sync::Arc;

use ffwd::prelude::*;
use ffwd_serve::ServeOptions;
use serde_json::json;
use support::{post_json, request, sse_data, Server};

fn opts(models: Vec<(&str, &std::path::Path)>) -> ServeOptions {
    ServeOptions { models: models.into_iter().map(|(n, p)| (n.to_string(), p.to_path_buf())).collect(), log_requests: false, ..Default::default() }
}

#[test]
fn predictions_equal_the_library_bit_for_bit_json_and_raw() {
    let dir = tempfile::tempdir().unwrap();
    let (path, model, split) = support::classifier(dir.path(), LayerKind::Fff, LayerShape { depth: Some(3), ..Default::default() });
    let server = Server::start(opts(vec![("digits", &path)]));
    let n = 40;
    let x = &split.test.x[..n * 64];
    let want_p = model.predict_proba(x, n).unwrap();
    let want_c = model.predict(x, n).unwrap();
    let rows: Vec<&[f32]> = x.chunks(64).collect();
    let r = post_json(server.addr, "/v1/predict", &json!({"model": "digits", "inputs": rows}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let classes: Vec<u32> = serde_json::from_value(v["classes"].clone()).unwrap();
    let probs: Vec<Vec<f32>> = serde_json::from_value(v["probabilities"].clone()).unwrap();
    assert_eq!(classes, want_c);
    let got: Vec<u32> = probs.concat().iter().map(|p| p.to_bits()).collect();
    assert_eq!(got, want_p.iter().map(|p| p.to_bits()).collect::<Vec<_>>(), "probabilities differ from the library's");
    // the same rows as a raw little-endian f32 body
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let r = request(server.addr, "POST", "/v1/predict", &[("Content-Type", "application/octet-stream"), ("X-Width", "64"), ("X-Model", "digits")], &raw);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(serde_json::from_value::<Vec<u32>>(r.json()["classes"].clone()).unwrap(), want_c);
    // the model is the only one: `model` may be left out; /v1/models, /health, /metrics
    assert_eq!(post_json(server.addr, "/v1/predict", &json!({"inputs": [rows[0]]})).json()["classes"][0], want_c[0]);
    let m = request(server.addr, "GET", "/v1/models", &[], b"").json();
    assert_eq!((m["data"][0]["id"].as_str(), m["data"][0]["in_features"].as_u64()), (Some("digits"), Some(64)));
    assert_eq!(request(server.addr, "GET", "/health", &[], b"").status, 200);
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("ffwd_requests_total{route=\"/v1/predict\",status=\"200\"} 3"), "{metrics}");
    assert!(metrics.contains("ffwd_batch_size_bucket{model=\"digits\",le=\"64\"}"), "{metrics}");
    // leaf usage of the tree: 40 + 40 + 1 samples over 8 leaves
    let usage: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ffwd_route_usage_total{model=\"digits\",leaf="))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(usage, 81, "{metrics}");
}

#[test]
fn sixty_four_concurrent_requests_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (path, model, split) = support::classifier(dir.path(), LayerKind::Dense, LayerShape::default());
    let server = Server::start(opts(vec![("dense", &path)]));
    let addr = server.addr;
    let split = Arc::new(split);
    let model = Arc::new(model);
    let workers: Vec<_> = (0..64)
        .map(|i| {
            let (split, model) = (split.clone(), model.clone());
            std::thread::spawn(move || {
                // request i sends 1 + i % 3 rows starting at row i
                let rows = 1 + i % 3;
                let x = &split.test.x[i * 64..(i + rows) * 64];
                let r = post_json(addr, "/v1/predict", &json!({"inputs": x.chunks(64).collect::<Vec<_>>()}));
                assert_eq!(r.status, 200, "{}", r.text());
                let got: Vec<u32> = serde_json::from_value(r.json()["classes"].clone()).unwrap();
                let probs: Vec<Vec<f32>> = serde_json::from_value(r.json()["probabilities"].clone()).unwrap();
                // batched with other requests' rows: the same classes, probabilities to rounding
                // (a product's summation order depends on the batch it runs in)
                assert_eq!(got, model.predict(x, rows).unwrap(), "request {i}");
                for (a, b) in probs.concat().iter().zip(model.predict_proba(x, rows).unwrap()) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "request {i}: {a} vs {b}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a request failed");
    }
}

#[test]
fn completions_equal_the_generator_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let (path, ck) = support::lm(dir.path());
    let server = Server::start(opts(vec![("lm", &path)]));
    // 60 tokens with a context of 24: the context fills and restarts from its last half
    for (prompt, seed, temperature, top_k) in [("ROMEO:", 1, 0.8, 0), ("The ", 7, 1.0, 5), ("a", 3, 0.0, 0)] {
        let want = ck.generate_text(prompt, 60, temperature, top_k, seed).unwrap();
        let body = json!({"model": "lm", "prompt": prompt, "max_tokens": 60, "temperature": temperature, "top_k": top_k, "seed": seed});
        let r = post_json(server.addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()));
        assert_eq!(v["usage"]["completion_tokens"], 60);
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let r = post_json(server.addr, "/v1/completions", &stream);
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
        let events = sse_data(&r.body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let text: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, want, "streamed text");
        assert_eq!(events.len(), 60 + 2, "one event per token, a final chunk, [DONE]");
    }
    // eight concurrent streams decode together and each gets a well-formed completion
    let addr = server.addr;
    let workers: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let r = post_json(addr, "/v1/completions", &json!({"prompt": "The ", "max_tokens": 30, "seed": i, "stream": true}));
                let events = sse_data(&r.body);
                assert_eq!((r.status, events.len(), events.last().map(String::as_str)), (200, 32, Some("[DONE]")), "{}", r.text());
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a stream failed");
    }
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("ffwd_generated_tokens_total{model=\"lm\"} 600"), "{metrics}");
}

#[test]
fn bad_input_gets_its_status_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (cpath, _, _) = support::classifier(dir.path(), LayerKind::Dense, LayerShape::default());
    let (lpath, _) = support::lm(dir.path());
    let mut o = opts(vec![("c", &cpath), ("lm", &lpath)]);
    (o.max_tokens, o.body_limit) = (100, 64 << 10);
    let server = Server::start(o);
    let a = server.addr;
    let row = vec![1.0f32; 64];
    let cases: Vec<(support::Reply, u16, &str, &str)> = vec![
        (request(a, "POST", "/v1/predict", &[("Content-Type", "application/json")], b"{\"inputs\": [[1,2"), 400, "body", "malformed"),
        (post_json(a, "/v1/predict", &json!({"model": "c", "inputs": [[1.0, 2.0]]})), 400, "inputs", "expects 64"),
        (post_json(a, "/v1/predict", &json!({"model": "c", "inputs": [row.clone(), vec![1.0]]})), 400, "inputs", "inputs[1] has 1 values"),
        (post_json(a, "/v1/predict", &json!({"model": "c", "inputs": []})), 400, "inputs", "empty"),
        (post_json(a, "/v1/predict", &json!({"model": "nope", "inputs": [row.clone()]})), 404, "model", "unknown model `nope`"),
        (post_json(a, "/v1/predict", &json!({"inputs": [row.clone()]})), 400, "model", "required"),
        (post_json(a, "/v1/predict", &json!({"model": "c", "inputs": [row.clone()], "extra": 1})), 400, "body", "unknown field `extra`"),
        (post_json(a, "/v1/predict", &json!({"model": "lm", "inputs": [row.clone()]})), 400, "model", "language model"),
        (post_json(a, "/v1/completions", &json!({"model": "lm", "prompt": "ROMEO\u{1F600}"})), 400, "prompt", "vocabulary"),
        (post_json(a, "/v1/completions", &json!({"model": "lm", "prompt": "A", "max_tokens": 101})), 400, "max_tokens", "limit of 100"),
        (post_json(a, "/v1/completions", &json!({"model": "lm", "prompt": "A", "temperature": -1})), 400, "temperature", "finite"),
        (post_json(a, "/v1/completions", &json!({"model": "lm", "prompt": ""})), 400, "prompt", "empty"),
        (post_json(a, "/v1/completions", &json!({"model": "c", "prompt": "A"})), 400, "model", "classifier"),
    ];
    for (i, (r, status, param, words)) in cases.into_iter().enumerate() {
        assert_eq!(r.status, status, "case {i}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["param"].as_str(), Some(param), "case {i}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "case {i}: {v}");
    }
    // raw bodies: NaN, a missing width, a ragged body
    let mut nan = row.clone();
    nan[5] = f32::NAN;
    let raw = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let r = request(a, "POST", "/v1/predict", &[("Content-Type", "application/octet-stream"), ("X-Width", "64"), ("X-Model", "c")], &raw(&nan));
    assert_eq!((r.status, r.json()["error"]["message"].as_str().unwrap().contains("non-finite value at row 0, column 5")), (400, true), "{}", r.text());
    let r = request(a, "POST", "/v1/predict", &[("Content-Type", "application/octet-stream"), ("X-Model", "c")], &raw(&row));
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("X-Width")));
    let r = request(a, "POST", "/v1/predict", &[("Content-Type", "application/octet-stream"), ("X-Width", "64")], &raw(&row)[..100]);
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("body")));
    // a body over the limit
    let big = vec![b' '; 100 << 10];
    assert_eq!(request(a, "POST", "/v1/predict", &[("Content-Type", "application/json")], &big).status, 413);
    // the server still answers
    assert_eq!(post_json(a, "/v1/predict", &json!({"model": "c", "inputs": [row]})).status, 200);
}

#[test]
fn requests_beyond_the_concurrency_limit_get_429_and_a_client_that_leaves_frees_its_stream() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = support::lm(dir.path());
    let mut o = opts(vec![("lm", &path)]);
    (o.max_concurrent, o.max_tokens) = (1, 200_000);
    let server = Server::start(o);
    let addr = server.addr;
    // a stream whose client reads its head and then stops reading holds the only permit
    let mut held = std::net::TcpStream::connect(addr).unwrap();
    let body = json!({"prompt": "A", "max_tokens": 200_000, "stream": true}).to_string();
    write!(held, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    let n = held.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..n]));
    let r = post_json(addr, "/v1/completions", &json!({"prompt": "A", "max_tokens": 1}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("more than 1 requests in flight"));
    assert_eq!(request(addr, "GET", "/health", &[], b"").status, 200, "health is not limited");
    // the client leaves: its sequence leaves the batch and the permit comes back
    drop(held);
    let t0 = std::time::Instant::now();
    loop {
        let r = post_json(addr, "/v1/completions", &json!({"prompt": "A", "max_tokens": 1}));
        if r.status == 200 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "the abandoned stream still holds its permit: {}", r.status);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

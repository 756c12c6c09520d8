//! `ffwd serve`: the HTTP inference server (crate `ffwd-serve`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use ffwd_serve::ServeOptions;

/// Options of `ffwd serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A checkpoint to serve (classifier, Forward-Forward net or LM), as `PATH` (named by its
    /// file stem) or `NAME=PATH`; repeat for several models.
    #[arg(long = "model", value_name = "[NAME=]PATH", required = true)]
    models: Vec<String>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Rows per classifier call and sequences per LM decoding step at most; requests that
    /// queue while a model is busy are batched up to this (1 = no batching).
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Requests in flight at most (streams count until they end); more get 429 with Retry-After.
    #[arg(long, default_value_t = 512)]
    max_concurrent: usize,
    /// Largest `max_tokens` a completion may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    body_limit_mib: usize,
    /// Weight matrices of classifiers' layers and of LMs' FFN blocks in bf16 (dense, ufff, fff
    /// leaves, moe/smoe/moefied experts; an LM's attention stays f32).
    #[arg(long)]
    bf16: bool,
}

/// Whether `RUST_LOG` lets `info` lines through (unset: yes).
fn log_info() -> bool {
    match std::env::var("RUST_LOG") {
        Ok(v) => {
            let v = v.to_ascii_lowercase();
            !(v.contains("off") || v.contains("error") || v.contains("warn")) || v.contains("info") || v.contains("debug") || v.contains("trace")
        }
        Err(_) => true,
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let threads = super::init_threads(a.threads)?;
    let models = a
        .models
        .iter()
        .map(|m| match m.split_once('=') {
            Some((name, path)) if !name.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
            Some(_) => anyhow::bail!("--model {m}: empty NAME (use NAME=PATH or PATH)"),
            None => {
                let path = PathBuf::from(m);
                let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
                Ok((name, path))
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = ServeOptions {
        models,
        max_batch: a.max_batch,
        max_concurrent: a.max_concurrent,
        max_tokens: a.max_tokens,
        body_limit: a.body_limit_mib.saturating_mul(1 << 20),
        bf16: a.bf16,
        log_requests: log_info(),
        threads: a.threads,
    };
    if a.bf16 {
        super::note_bf16_speed();
    }
    let state = ffwd_serve::load(&opts)?;
    let names: Vec<&str> = opts.models.iter().map(|(n, _)| n.as_str()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    rt.block_on(ffwd_serve::run(
        state,
        SocketAddr::new(a.host, a.port),
        |addr| eprintln!("serving {} on http://{addr} ({threads} compute threads, batches up to {})", names.join(", "), a.max_batch),
        ffwd_serve::shutdown_signal(),
    ))?;
    eprintln!("stopped");
    Ok(())
}

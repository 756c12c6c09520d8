//! Batched incremental decoding of the default `ffwd lm` model (4 × 192, context 128, dense
//! GELU FFN 768): time per [`ffwd::models::Decoder::step`] and tokens/s with 1, 2, 4, 8 and
//! 16 sequences stepped together (medians over alternating rounds), run on a thread of the
//! compute pool as the server's decoding worker is.
//!
//! ```sh
//! cargo bench --bench decode
//! ```

use std::time::Instant;

use ffwd::models::{Lm, LmConfig, Sequence};

fn main() -> ffwd::Result<()> {
    let lm = Lm::new(LmConfig { vocab: 65, ..Default::default() }, 0)?;
    let ns = [1usize, 2, 4, 8, 16];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ns.len()];
    let mut result = Ok(());
    rayon::scope(|s| {
        s.spawn(|_| {
            result = (|| -> ffwd::Result<()> {
                for _round in 0..5 {
                    for (k, &n) in ns.iter().enumerate() {
                        let mut dec = lm.decoder();
                        let mut seqs: Vec<Sequence> = (0..n).map(|_| lm.sequence()).collect();
                        let tokens: Vec<u32> = (0..n as u32).collect();
                        let steps = 100;
                        let t0 = Instant::now();
                        for _ in 0..steps {
                            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
                            dec.step(&mut refs, &tokens)?;
                        }
                        times[k].push(t0.elapsed().as_secs_f64() / steps as f64);
                    }
                }
                Ok(())
            })();
        })
    });
    result?;
    println!("decoding step of the default LM, {} threads (median of 5 rounds × 100 steps)", rayon::current_num_threads());
    let base = {
        let mut t = times[0].clone();
        t.sort_by(f64::total_cmp);
        1.0 / t[2]
    };
    for (k, &n) in ns.iter().enumerate() {
        let mut t = times[k].clone();
        t.sort_by(f64::total_cmp);
        let tps = n as f64 / t[2];
        println!("  {n:>2} sequences: {:.3} ms/step, {tps:>7.0} tokens/s, {:.2}x one sequence", t[2] * 1e3, tps / base);
    }
    Ok(())
}

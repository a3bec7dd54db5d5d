//! A bare upstream for the load benchmark (`benches/load/run.sh`): the smallest hyper 1 server
//! that answers every request with one fixed JSON export body, `200`, `content-type:
//! application/json`, keep-alive. It stands for the "bare limit" (what serving bytes from
//! memory costs with hyper) and is also the upstream behind the gateway and nginx in the
//! benchmark; it ignores `Authorization` and the path.
//!
//! ```sh
//! cargo run --release --example bare_upstream -- --listen 127.0.0.1:18081 [--body-bytes 2048] [--threads 1]
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "bare_upstream",
    about = "A minimal hyper server answering every request with a fixed JSON export body"
)]
struct Args {
    /// Address to listen on (loopback for the benchmark).
    #[arg(long, default_value = "127.0.0.1:18081")]
    listen: SocketAddr,
    /// Size of the JSON body in bytes (padded or trimmed to exactly this length).
    #[arg(long, default_value_t = 2048)]
    body_bytes: usize,
    /// Tokio worker threads; 1 runs a current_thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// A JSON document of exactly `n` bytes (or the smallest valid one, when `n` is tiny), shaped
/// like the gateway's mock export (`convocore_gateway::testing::samples::json`): generated turns
/// of varied text (so compression ratios are those of a real conversation, not of one repeated
/// turn) approach `n`, and the `notes` string is padded to hit it exactly.
fn export_body(n: usize) -> String {
    use convocore_gateway::testing::samples;
    let base = samples::json("eu", "agent-bench", "convo-bench", 1, 0);
    if base.len() > n {
        // Smaller than the sample: a trimmed export of the same outer shape.
        let head = r#"{"success":true,"message":"Conversation exported successfully","data":""#;
        let tail = r#""}"#;
        let pad = n.saturating_sub(head.len() + tail.len());
        return format!("{head}{}{tail}", "x".repeat(pad));
    }
    let per_turn =
        (samples::json("eu", "agent-bench", "convo-bench", 1, 64).len() - base.len()) / 64;
    let turns = (n - base.len()) / per_turn.max(1);
    let full = samples::json("eu", "agent-bench", "convo-bench", 1, turns);
    let mut doc: serde_json::Value = match serde_json::from_str(&full) {
        Ok(v) => v,
        Err(_) => return base,
    };
    let mut text = doc.to_string();
    while text.len() > n {
        // Overshoot (commas, rounding): drop one turn at a time; bounded by the turns' count.
        let popped = doc["data"]["turns"]
            .as_array_mut()
            .and_then(|a| a.pop())
            .is_some();
        text = doc.to_string();
        if !popped {
            break;
        }
    }
    if text.len() < n {
        let notes = doc["data"]["metadata"]["convo"]["notes"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        doc["data"]["metadata"]["convo"]["notes"] =
            serde_json::Value::String(format!("{notes}{}", ".".repeat(n - text.len())));
        text = doc.to_string();
    }
    text
}

async fn serve(listener: TcpListener, body: Bytes) {
    let content_type = HeaderValue::from_static("application/json");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bare_upstream: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let content_type = content_type.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let mut resp = Response::new(Full::new(body.clone()));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, content_type.clone());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let body = Bytes::from(export_body(args.body_bytes));
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare_upstream: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bare_upstream: cannot listen on {}: {e}", args.listen);
                return ExitCode::from(1);
            }
        };
        eprintln!(
            "bare_upstream: listening on {} ({} body bytes, {} thread(s))",
            args.listen,
            body.len(),
            args.threads.max(1)
        );
        serve(listener, body).await;
        ExitCode::SUCCESS
    })
}

//! Streaming benchmarks of the providers (`cargo bench -p descartes-providers --bench streaming`):
//!
//! (a) parse throughput: a 10 MB OpenAI Chat Completions SSE stream through the pure
//!     [`SseStreamDecoder`] + [`OpenAiStreamParser`], fed in 16 KiB pieces: MB/s;
//! (b) streaming overhead: a real loopback HTTP server writes one small SSE chunk at a time to
//!     the connection an [`OpenAiProvider`] stream reads; the time from just before the write
//!     to the `TextDelta` reaching the consumer of the `ModelStream` (p50/p90/p99).
//!
//! Options: `--quick` (fewer samples).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use descartes_core::{ModelRequest, Provider, StreamEvent};
use descartes_protocol::Message;
use descartes_providers::{OpenAiProvider, OpenAiStreamParser, ProviderSettings, SseStreamDecoder};
use futures::StreamExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn frame(text: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
        serde_json::to_string(text).unwrap()
    )
}

fn stream_bytes(target: usize) -> Vec<u8> {
    let words =
        ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".\n", " Über", " naïve"];
    let mut out = String::with_capacity(target + 1024);
    let mut i = 0;
    while out.len() < target {
        out.push_str(&frame(words[i % words.len()]));
        i += 1;
    }
    out.push_str("data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn parse_throughput(quick: bool) {
    let bytes = stream_bytes(10 * 1024 * 1024);
    let runs = if quick { 3 } else { 10 };
    let mut best = f64::MAX;
    let mut total = Duration::ZERO;
    let mut events = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let mut decoder = SseStreamDecoder::new(OpenAiStreamParser::new("openai"));
        let mut out = Vec::with_capacity(1024);
        events = 0;
        for piece in bytes.chunks(16 * 1024) {
            decoder.feed(piece, &mut out).unwrap();
            events += out.len();
            out.clear();
        }
        decoder.finish(&mut out).unwrap();
        events += out.len();
        let elapsed = start.elapsed();
        total += elapsed;
        best = best.min(elapsed.as_secs_f64());
    }
    let mb = bytes.len() as f64 / 1e6;
    let mean = total.as_secs_f64() / runs as f64;
    println!(
        "parse: {:.1} MB OpenAI SSE, {events} events: mean {:.1} MB/s, best {:.1} MB/s ({runs} runs)",
        mb,
        mb / mean,
        mb / best
    );
}

/// A one-connection HTTP/1.1 server: answers the first request with a chunked event stream,
/// then writes one SSE frame per message on `go`, sending back the instant just before each
/// write.
fn serve(listener: TcpListener, go: mpsc::Receiver<Option<String>>, stamps: mpsc::Sender<Instant>) {
    let (mut socket, _) = listener.accept().unwrap();
    socket.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    socket
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .unwrap();
    while let Ok(Some(data)) = go.recv() {
        let chunk = format!("{:x}\r\n{data}\r\n", data.len());
        let t0 = Instant::now();
        socket.write_all(chunk.as_bytes()).unwrap();
        stamps.send(t0).unwrap();
    }
    let end = frame_end();
    socket.write_all(format!("{:x}\r\n{end}\r\n0\r\n\r\n", end.len()).as_bytes()).unwrap();
}

fn frame_end() -> String {
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n".into()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn streaming_overhead(quick: bool) {
    let samples = if quick { 300 } else { 3000 };
    let warmup = 200;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<Option<String>>();
    let (stamp_tx, stamp_rx) = mpsc::channel::<Instant>();
    let server = std::thread::spawn(move || serve(listener, go_rx, stamp_tx));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut latencies = runtime.block_on(async move {
        let settings = ProviderSettings::openai(Some("sk-bench".into())).with_base_url(format!("http://{addr}/v1"));
        let provider = OpenAiProvider::new(settings).unwrap();
        let request = ModelRequest {
            model: "bench".into(),
            system: None,
            messages: vec![Message::user_text("hi")].into(),
            tools: Vec::new().into(),
            max_tokens: None,
            temperature: None,
        };
        let mut stream = provider.stream(request).await.unwrap();
        let mut latencies = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            go_tx.send(Some(frame("tok"))).unwrap();
            match stream.next().await {
                Some(Ok(StreamEvent::TextDelta(_))) => {}
                other => panic!("unexpected {other:?}"),
            }
            let t1 = Instant::now();
            let t0 = stamp_rx.recv().unwrap();
            if i >= warmup {
                latencies.push(t1.saturating_duration_since(t0));
            }
        }
        go_tx.send(None).unwrap();
        while let Some(item) = stream.next().await {
            item.unwrap();
        }
        latencies
    });
    server.join().unwrap();
    latencies.sort_unstable();
    println!(
        "stream overhead (write on loopback socket -> TextDelta at the ModelStream consumer), {} samples: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.9).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        latencies.last().unwrap().as_secs_f64() * 1e6,
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    parse_throughput(quick);
    streaming_overhead(quick);
}

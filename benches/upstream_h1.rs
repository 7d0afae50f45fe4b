//! Parsing a backend's response head, once per proxied HTTP/1.1 request:
//! `cargo bench --bench upstream_h1`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use switchyard::upstream_h1::head::parse_response;

/// What switchyard's stand-in answers (the benches' backends).
const STAND_IN: &[u8] =
    b"HTTP/1.1 200 OK\r\nx-upstream: up1\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\n";

/// What an nginx or an app framework behind it typically answers.
const APP: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 12:00:00 GMT\r\n\
Content-Type: application/json; charset=utf-8\r\nContent-Length: 1234\r\nConnection: keep-alive\r\n\
Cache-Control: no-store\r\nX-Request-Id: 6f1c2a9e-3b7d-4c55-9a0e-2d4f8b1e7c30\r\nVary: Accept-Encoding\r\n\r\n";

fn bench(c: &mut Criterion) {
    for (name, head) in [("stand_in", STAND_IN), ("app", APP)] {
        c.bench_function(&format!("parse_response/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(head),
                |buf| black_box(parse_response(buf, &Method::GET).unwrap().unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Request heads end to end: arbitrary bytes from a client through hyper's HTTP/1.1 server
//! (configured as the proxy configures it) into a service that does what `Proxy::handle` and
//! `Proxy::forward` do before the request goes upstream: take the authority or `Host`, make
//! it a route key, look it up, strip hop-by-hop headers and add the forwarded ones.
#![no_main]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use homeport_fuzz::{checked_forward_headers, checked_lookup, checked_route_key};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The proxy's `MAX_HEADER_BYTES` (`max_buf_size` of its HTTP/1.1 connections).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Bodies are read (chunked decoding is request handling too) up to this much.
const MAX_BODY_BYTES: usize = 64 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let client = match data.len() % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        1 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
        _ => IpAddr::V6(Ipv4Addr::new(198, 51, 100, 2).to_ipv6_mapped()),
    };
    runtime().block_on(exchange(data, client));
});

/// One connection: the client writes `data` and closes its sending side, then reads all.
async fn exchange(data: &[u8], client: IpAddr) {
    let (client_io, server_io) = tokio::io::duplex(16 * 1024);
    let server = http1::Builder::new()
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(
            TokioIo::new(server_io),
            service_fn(move |req| handle(req, client)),
        )
        .with_upgrades();
    let (mut rx, mut tx) = tokio::io::split(client_io);
    let send = async {
        let _ = tx.write_all(data).await;
        let _ = tx.shutdown().await;
    };
    let receive = async {
        let mut sink = Vec::new();
        let _ = rx.read_to_end(&mut sink).await;
    };
    let _ = tokio::join!(server, send, receive);
}

async fn handle(
    req: Request<Incoming>,
    client: IpAddr,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    // As `Proxy::handle`: the request target's authority wins over `Host`.
    let Some(host) = homeport::proxy::request_host(&req).map(str::to_string) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let key = checked_route_key(&host);
    let app = checked_lookup(&host, key.as_deref());
    let Some(key) = key else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    // As `Proxy::forward` (here for every well-formed host, routed or not, to reach more).
    checked_forward_headers(req.headers(), client, &key);
    let _ = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await;
    Ok(status(match app {
        Some(_) => StatusCode::OK,
        None => StatusCode::NOT_FOUND,
    }))
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = code;
    resp
}

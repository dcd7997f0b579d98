//! The examples' web server: HTTP/1.1 on `hyper` (already in the build through `reqwest` and
//! the fake server), GET only, the app's routes as one `async fn`.
//!
//! A real app uses its web framework (axum, actix-web, …): a route handler there does what
//! the examples' handlers do with a [`Request`] and a [`Page`]. This keeps the examples' build
//! small (no framework compiled for them).
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, LOCATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A GET request: its path and its raw query string (empty without one).
pub struct Request {
    /// `/callback`, …
    pub path: String,
    /// Everything after `?`, still percent-encoded.
    pub query: String,
}

impl Request {
    /// The decoded value of the query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.into_owned())
    }
}

/// What a route answers: a status with a plain-text page, or a redirect.
pub struct Page {
    status: StatusCode,
    text: String,
    location: Option<String>,
}

impl Page {
    /// `200 OK` with `text`.
    pub fn ok(text: impl Into<String>) -> Self {
        Self::status(StatusCode::OK, text)
    }

    /// `status` with `text`.
    pub fn status(status: StatusCode, text: impl Into<String>) -> Self {
        Self {
            status,
            text: text.into(),
            location: None,
        }
    }

    /// `303 See Other` to `url`: the browser follows it with a GET.
    pub fn redirect(url: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SEE_OTHER,
            text: String::new(),
            location: Some(url.into()),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let location = match self.location.map(HeaderValue::try_from).transpose() {
            Ok(location) => location,
            Err(_) => {
                return Self::status(StatusCode::INTERNAL_SERVER_ERROR, "bad redirect URL")
                    .into_response()
            }
        };
        let mut response = Response::new(Full::new(Bytes::from(self.text)));
        *response.status_mut() = self.status;
        if let Some(location) = location {
            response.headers_mut().insert(LOCATION, location);
        }
        response
    }
}

/// Answers every GET request on `listener` with `app(state, request)`, each connection on its
/// own task, until the task running this is aborted or the runtime ends.
pub async fn serve<S, F, Fut>(listener: TcpListener, state: S, app: F)
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Request) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Page> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, …: give the open connections a moment to finish.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let state = state.clone();
            async move {
                if request.method() != Method::GET {
                    return Ok::<_, Infallible>(
                        Page::status(StatusCode::METHOD_NOT_ALLOWED, "GET only").into_response(),
                    );
                }
                let request = Request {
                    path: request.uri().path().to_owned(),
                    query: request.uri().query().unwrap_or_default().to_owned(),
                };
                Ok(app(state, request).await.into_response())
            }
        });
        tokio::spawn(async move {
            // A browser that hangs up early is no concern of the app's.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

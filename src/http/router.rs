//! Routing: a `matchit` table from path to [`Route`], then a match on the
//! route and method to its handler. Unknown paths are `404 not_found`, known
//! paths with another method `405 method_not_allowed`.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use hyper::Method;
use hyper::body::Incoming;
use hyper::header::{ALLOW, HeaderValue};
use tracing::Instrument;

use super::handlers::{admin, admission, ops, orders, public, purchase};
use super::request::Request;
use super::{ApiError, Response};
use crate::app::AppState;

/// Every route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    AdminPromotions,
    AdminPromotion,
    Promotions,
    Promotion,
    Purchase,
    PurchaseResult,
    Orders,
    OrderPay,
    OrderCancel,
    Token,
    Captcha,
}

impl Route {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Metrics => "metrics",
            Route::AdminPromotions => "admin_promotions",
            Route::AdminPromotion => "admin_promotion",
            Route::Promotions => "promotions",
            Route::Promotion => "promotion",
            Route::Purchase => "purchase",
            Route::PurchaseResult => "purchase_result",
            Route::Orders => "orders",
            Route::OrderPay => "order_pay",
            Route::OrderCancel => "order_cancel",
            Route::Token => "token",
            Route::Captcha => "captcha",
        }
    }

    fn allowed(self) -> &'static str {
        match self {
            Route::AdminPromotions => "GET, POST",
            Route::AdminPromotion => "GET, PUT, DELETE",
            Route::Purchase | Route::OrderPay | Route::OrderCancel | Route::Token => "POST",
            _ => "GET",
        }
    }
}

static ROUTES: LazyLock<matchit::Router<Route>> = LazyLock::new(|| {
    let mut r = matchit::Router::new();
    let table = [
        ("/health", Route::Health),
        ("/ready", Route::Ready),
        ("/metrics", Route::Metrics),
        ("/admin/promotions", Route::AdminPromotions),
        ("/admin/promotions/{id}", Route::AdminPromotion),
        ("/api/promotions", Route::Promotions),
        ("/api/promotions/{id}", Route::Promotion),
        ("/api/promotions/{id}/purchase", Route::Purchase),
        ("/api/promotions/{id}/result", Route::PurchaseResult),
        ("/api/promotions/{id}/token", Route::Token),
        ("/api/promotions/{id}/captcha", Route::Captcha),
        ("/api/orders", Route::Orders),
        ("/api/orders/{id}/pay", Route::OrderPay),
        ("/api/orders/{id}/cancel", Route::OrderCancel),
    ];
    for (path, route) in table {
        r.insert(path, route).expect("route table is valid");
    }
    r
});

/// Serves one request: route, authenticate inside the handler, answer.
pub async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let request_id = request_id(&parts.headers);
    let span = tracing::info_span!(
        "request",
        id = %request_id,
        method = %parts.method,
        route = tracing::field::Empty,
        promotion = tracing::field::Empty,
        user = tracing::field::Empty,
    );
    let mut res = dispatch(state, peer, parts, body, started)
        .instrument(span)
        .await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// The caller's `X-Request-Id` (as nginx sets it) when it is sane, else a new one.
fn request_id(headers: &hyper::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

async fn dispatch(
    state: Arc<AppState>,
    peer: SocketAddr,
    parts: hyper::http::request::Parts,
    body: Incoming,
    started: Instant,
) -> Response {
    let Ok(found) = ROUTES.at(parts.uri.path()) else {
        return finish("unknown", started, Err(ApiError::not_found()));
    };
    tracing::Span::current().record("route", found.value.label());
    if state.ops_only && !matches!(found.value, Route::Health | Route::Ready | Route::Metrics) {
        return finish("unknown", started, Err(ApiError::not_found()));
    }
    let route = *found.value;
    let param = found.params.get("id").map(str::to_string);
    let method = parts.method.clone();
    if parts.uri.path().starts_with("/api/") {
        let ip = state.limits.client_ip(peer, &parts.headers);
        if let Err(limited) = state.limits.check_ip(ip) {
            return finish(route.label(), started, Err(limited.into()));
        }
    }
    let req = Request {
        state,
        parts,
        body,
        param,
        peer,
    };
    let result = match (route, method) {
        (Route::Health, Method::GET) => ops::health(req).await,
        (Route::Ready, Method::GET) => ops::ready(req).await,
        (Route::Metrics, Method::GET) => ops::metrics(req).await,
        (Route::AdminPromotions, Method::GET) => admin::list(req).await,
        (Route::AdminPromotions, Method::POST) => admin::create(req).await,
        (Route::AdminPromotion, Method::GET) => admin::get(req).await,
        (Route::AdminPromotion, Method::PUT) => admin::update(req).await,
        (Route::AdminPromotion, Method::DELETE) => admin::delete(req).await,
        (Route::Promotions, Method::GET) => public::list(req).await,
        (Route::Promotion, Method::GET) => public::get(req).await,
        (Route::Purchase, Method::POST) => purchase::purchase(req).await,
        (Route::PurchaseResult, Method::GET) => purchase::result(req).await,
        (Route::Orders, Method::GET) => orders::list(req).await,
        (Route::OrderPay, Method::POST) => orders::pay(req).await,
        (Route::OrderCancel, Method::POST) => orders::cancel(req).await,
        (Route::Token, Method::POST) => admission::token(req).await,
        (Route::Captcha, Method::GET) => admission::captcha(req).await,
        _ => {
            let mut res = ApiError::method_not_allowed().into_response();
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.allowed()));
            return finish(route.label(), started, Ok(res));
        }
    };
    finish(route.label(), started, result)
}

fn finish(route: &'static str, started: Instant, result: Result<Response, ApiError>) -> Response {
    let res = result.unwrap_or_else(ApiError::into_response);
    let status = res.status().as_u16();
    metrics::counter!("seckill_http_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
    metrics::histogram!("seckill_http_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    res
}

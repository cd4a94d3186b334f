//! Routing: a `matchit` table from path to [`Route`], then a match on the
//! route and method to its handler. Unknown paths are `404 not_found`, known
//! paths with another method `405 method_not_allowed`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use hyper::Method;
use hyper::body::Incoming;
use hyper::header::{ALLOW, HeaderValue};
use tracing::Instrument;

use super::handlers::{
    accounts, admin, admission, openapi, ops, orders, public, purchase, reconcile, web,
};
use super::request::{self, Request};
use super::state::AppState;
use super::{ApiError, Response};

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
    Register,
    Login,
    OpenApi,
    AdminReconcile,
    SalePage,
    ConsolePage,
    WebAsset,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 21] = [
        Route::Health,
        Route::Ready,
        Route::Metrics,
        Route::AdminPromotions,
        Route::AdminPromotion,
        Route::Promotions,
        Route::Promotion,
        Route::Purchase,
        Route::PurchaseResult,
        Route::Orders,
        Route::OrderPay,
        Route::OrderCancel,
        Route::Token,
        Route::Captcha,
        Route::Register,
        Route::Login,
        Route::OpenApi,
        Route::AdminReconcile,
        Route::SalePage,
        Route::ConsolePage,
        Route::WebAsset,
    ];

    /// A short label for metrics and logs.
    pub const fn label(self) -> &'static str {
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
            Route::Register => "register",
            Route::Login => "login",
            Route::OpenApi => "openapi",
            Route::AdminReconcile => "admin_reconcile",
            Route::SalePage => "sale_page",
            Route::ConsolePage => "console_page",
            Route::WebAsset => "web_asset",
        }
    }

    pub(crate) fn allowed(self) -> &'static str {
        match self {
            Route::AdminPromotions => "GET, POST",
            Route::AdminPromotion => "GET, PUT, DELETE",
            Route::Purchase
            | Route::OrderPay
            | Route::OrderCancel
            | Route::Token
            | Route::Register
            | Route::Login => "POST",
            _ => "GET",
        }
    }
}

/// The `route` label of a request no route matched.
const UNKNOWN: &str = "unknown";

/// Every `route` label of the request metrics.
pub const ROUTE_LABELS: [&str; Route::ALL.len() + 1] = {
    let mut out = [UNKNOWN; Route::ALL.len() + 1];
    let mut i = 0;
    while i < Route::ALL.len() {
        out[i] = Route::ALL[i].label();
        i += 1;
    }
    out
};

pub(crate) static ROUTES: LazyLock<matchit::Router<Route>> = LazyLock::new(|| {
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
        ("/api/register", Route::Register),
        ("/api/login", Route::Login),
        ("/api/orders/{id}/pay", Route::OrderPay),
        ("/api/orders/{id}/cancel", Route::OrderCancel),
        ("/openapi.json", Route::OpenApi),
        ("/admin/reconcile", Route::AdminReconcile),
        ("/", Route::SalePage),
        ("/console/", Route::ConsolePage),
        ("/assets/{file}", Route::WebAsset),
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
    let found = ROUTES.at(parts.uri.path()).ok();
    let route = found.as_ref().map(|f| *f.value);
    let param = found.and_then(|f| f.params.get("id").map(str::to_string));
    // Every field the router knows is set here, once: recording a field later
    // costs a re-serialization of all of them with the JSON log format. Only
    // `user` (known after the handler authenticates) is recorded later.
    let (promotion, order) = match route {
        Some(Route::OrderPay | Route::OrderCancel) => (None, param.as_deref()),
        _ => (param.as_deref().and_then(|p| p.parse::<i64>().ok()), None),
    };
    let span = tracing::info_span!(
        "request",
        id = %request_id,
        method = %parts.method,
        route = route.map_or(UNKNOWN, Route::label),
        promotion,
        order,
        user = tracing::field::Empty,
    );
    crate::telemetry::context::continue_from(&span, || {
        parts.headers.get("traceparent").map(|v| v.as_bytes())
    });
    let mut res = dispatch(state, peer, route, param, parts, body, started)
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
    route: Option<Route>,
    param: Option<String>,
    parts: hyper::http::request::Parts,
    body: Incoming,
    started: Instant,
) -> Response {
    let Some(route) = route else {
        return finish(UNKNOWN, started, Err(ApiError::not_found()));
    };
    if state.ops_only && !matches!(route, Route::Health | Route::Ready | Route::Metrics) {
        return finish(UNKNOWN, started, Err(ApiError::not_found()));
    }
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
    // Each handler's future is boxed: inline, the dispatch future would be as
    // large as the largest handler's (those with Redis and PostgreSQL calls),
    // and every move of it (into the span, the user slot, hyper) copied
    // kilobytes per request.
    let handler: Handler = match (route, method) {
        (Route::Health, Method::GET) => Box::pin(ops::health(req)),
        (Route::Ready, Method::GET) => Box::pin(ops::ready(req)),
        (Route::Metrics, Method::GET) => Box::pin(ops::metrics(req)),
        (Route::AdminPromotions, Method::GET) => Box::pin(admin::list(req)),
        (Route::AdminPromotions, Method::POST) => Box::pin(admin::create(req)),
        (Route::AdminPromotion, Method::GET) => Box::pin(admin::get(req)),
        (Route::AdminPromotion, Method::PUT) => Box::pin(admin::update(req)),
        (Route::AdminPromotion, Method::DELETE) => Box::pin(admin::delete(req)),
        (Route::Promotions, Method::GET) => Box::pin(public::list(req)),
        (Route::Promotion, Method::GET) => Box::pin(public::get(req)),
        (Route::Purchase, Method::POST) => Box::pin(purchase::purchase(req)),
        (Route::PurchaseResult, Method::GET) => Box::pin(purchase::result(req)),
        (Route::Orders, Method::GET) => Box::pin(orders::list(req)),
        (Route::OrderPay, Method::POST) => Box::pin(orders::pay(req)),
        (Route::OrderCancel, Method::POST) => Box::pin(orders::cancel(req)),
        (Route::Token, Method::POST) => Box::pin(admission::token(req)),
        (Route::Captcha, Method::GET) => Box::pin(admission::captcha(req)),
        (Route::Register, Method::POST) => Box::pin(accounts::register(req)),
        (Route::Login, Method::POST) => Box::pin(accounts::login(req)),
        (Route::OpenApi, Method::GET) => Box::pin(openapi::document(req)),
        (Route::AdminReconcile, Method::GET) => Box::pin(reconcile::report(req)),
        (Route::SalePage, Method::GET) => Box::pin(web::sale_page(req)),
        (Route::ConsolePage, Method::GET) => Box::pin(web::console_page(req)),
        (Route::WebAsset, Method::GET) => Box::pin(web::asset(req)),
        _ => {
            let mut res = ApiError::method_not_allowed().into_response();
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.allowed()));
            Box::pin(std::future::ready(Ok(res)))
        }
    };
    let result = request::with_user_slot(handler).await;
    finish(route.label(), started, result)
}

/// A handler's answer, boxed (see `dispatch`).
type Handler = Pin<Box<dyn Future<Output = Result<Response, ApiError>> + Send>>;

fn finish(route: &'static str, started: Instant, result: Result<Response, ApiError>) -> Response {
    let res = result.unwrap_or_else(ApiError::into_response);
    let status = status_label(res.status());
    metrics::counter!("seckill_http_requests_total", "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("seckill_http_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    res
}

/// "100" to "599" made once, so the request counter's status label costs no
/// allocation per request.
static STATUS_LABELS: LazyLock<Vec<String>> =
    LazyLock::new(|| (100..600).map(|code: u16| code.to_string()).collect());

fn status_label(status: hyper::StatusCode) -> &'static str {
    usize::from(status.as_u16())
        .checked_sub(100)
        .and_then(|i| STATUS_LABELS.get(i))
        .map_or("other", String::as_str)
}

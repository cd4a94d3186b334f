//! `GET /openapi.json`: the OpenAPI 3.1 document of the whole API, the file
//! `docs/openapi.json` built into the binary, served as it is with an `ETag`
//! and a public `Cache-Control`.
//!
//! The document is written by hand and held against the code by the tests
//! below: every route of the router's table is in it with exactly the
//! methods the router allows, and nothing else is; every error code of
//! [`Code`](crate::http::Code) is in it, and each response lists only codes
//! whose status is that response's. Schemathesis (`scripts/schemathesis.sh`)
//! then checks the live answers against it.

use std::sync::LazyLock;

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, ETAG, HeaderValue};

use crate::http::request::{Request, content_etag};
use crate::http::{ApiError, Response, empty, json_bytes};

/// The document, as `docs/openapi.json` holds it.
pub const DOCUMENT: &str = include_str!("../../../docs/openapi.json");

/// How long a cache (a browser, nginx, a CDN) may keep the document: it
/// changes only with a new build, and a stale copy for a few minutes is
/// harmless.
const CACHE_CONTROL_VALUE: &str = "public, max-age=300";

/// The strong `ETag` of the document: the start of its SHA-256.
static ETAG_VALUE: LazyLock<HeaderValue> = LazyLock::new(|| content_etag(DOCUMENT.as_bytes()));

/// `200` with the document, or `304` when the caller's `If-None-Match`
/// names its `ETag`.
pub async fn document(req: Request) -> Result<Response, ApiError> {
    let mut res = if req.holds_current(&ETAG_VALUE) {
        empty(StatusCode::NOT_MODIFIED)
    } else {
        json_bytes(StatusCode::OK, Bytes::from_static(DOCUMENT.as_bytes()))
    };
    let headers = res.headers_mut();
    headers.insert(ETAG, ETAG_VALUE.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL_VALUE));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::DOCUMENT;
    use crate::http::Code;
    use crate::http::router::{ROUTES, Route};

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
    }

    /// The methods of each path of the document, upper-case.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let doc = document();
        doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .expect("a path item")
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(|k| k.to_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    /// A concrete path for a templated one: `{id}` and `{order_id}` filled.
    fn concrete(path: &str) -> String {
        path.replace("{id}", "7")
            .replace("{order_id}", "0190a1b2-c3d4")
    }

    #[test]
    fn every_route_of_the_router_is_in_the_document_with_its_methods_and_nothing_else() {
        let mut seen = BTreeSet::new();
        for (path, methods) in documented() {
            let route = ROUTES
                .at(&concrete(&path))
                .map(|m| *m.value)
                .unwrap_or_else(|_| panic!("{path} of the document is not a route"));
            let allowed: BTreeSet<String> =
                route.allowed().split(", ").map(str::to_string).collect();
            assert_eq!(
                methods, allowed,
                "{path}: the document's methods differ from the router's"
            );
            assert!(
                seen.insert(route.label()),
                "{path}: a second path for route {}",
                route.label()
            );
        }
        let all: BTreeSet<&str> = Route::ALL.iter().map(|r| r.label()).collect();
        let missing: Vec<_> = all.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "routes not in the document: {missing:?}"
        );
    }

    /// Every code of [`Code`]. The match has no wildcard: a new code does not
    /// compile until it is added here, and then this test wants it in the
    /// document.
    fn every_code() -> Vec<Code> {
        let all = [
            Code::InvalidRequest,
            Code::InvalidId,
            Code::Unauthorized,
            Code::NotFound,
            Code::MethodNotAllowed,
            Code::RequestTimeout,
            Code::PayloadTooLarge,
            Code::RateLimited,
            Code::SoldOut,
            Code::AlreadyPurchased,
            Code::NotStarted,
            Code::Ended,
            Code::InvalidToken,
            Code::InvalidCaptcha,
            Code::OrderCancelled,
            Code::OrderPaid,
            Code::OrderPending,
            Code::PromotionStarted,
            Code::PromotionHasOrders,
            Code::UsernameTaken,
            Code::InvalidCredentials,
            Code::Unavailable,
            Code::Internal,
        ];
        for code in all {
            match code {
                Code::InvalidRequest
                | Code::InvalidId
                | Code::Unauthorized
                | Code::NotFound
                | Code::MethodNotAllowed
                | Code::RequestTimeout
                | Code::PayloadTooLarge
                | Code::RateLimited
                | Code::SoldOut
                | Code::AlreadyPurchased
                | Code::NotStarted
                | Code::Ended
                | Code::InvalidToken
                | Code::InvalidCaptcha
                | Code::OrderCancelled
                | Code::OrderPaid
                | Code::OrderPending
                | Code::PromotionStarted
                | Code::PromotionHasOrders
                | Code::UsernameTaken
                | Code::InvalidCredentials
                | Code::Unavailable
                | Code::Internal => {}
            }
        }
        all.to_vec()
    }

    /// Follows a `$ref` to `#/components/...`.
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("a local $ref");
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("{r} does not resolve"))
            }
            None => v,
        }
    }

    /// The error codes a response lists: the `enum` its schema puts on
    /// `error.code`.
    fn codes_of(response: &Value) -> Vec<String> {
        let schema = &response["content"]["application/json"]["schema"];
        let Some(parts) = schema["allOf"].as_array() else {
            return Vec::new();
        };
        parts
            .iter()
            .filter_map(|p| p["properties"]["error"]["properties"]["code"]["enum"].as_array())
            .flatten()
            .map(|c| c.as_str().expect("a code is a string").to_string())
            .collect()
    }

    #[test]
    fn every_error_code_is_in_the_document_under_its_status() {
        let doc = document();
        let listed: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("ErrorCode lists the codes")
            .iter()
            .map(|c| c.as_str().expect("a code is a string"))
            .collect();
        let codes = every_code();
        let ours: BTreeSet<&str> = codes.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            listed, ours,
            "ErrorCode must list exactly the codes of Code"
        );

        let by_name: BTreeMap<&str, Code> = codes.iter().map(|c| (c.as_str(), *c)).collect();
        let mut answered = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                if method == "parameters" {
                    continue;
                }
                for (status, response) in op["responses"].as_object().expect("responses") {
                    let response = resolve(&doc, response);
                    for code in codes_of(response) {
                        let known = by_name
                            .get(code.as_str())
                            .unwrap_or_else(|| panic!("{method} {path}: unknown code {code}"));
                        assert_eq!(
                            known.status().as_str(),
                            status,
                            "{method} {path}: {code} is listed under {status}"
                        );
                        answered.insert(code);
                    }
                }
            }
        }
        // A 500 is a bug, so no operation promises one; 405 is for the
        // methods an operation does not have, which OpenAPI cannot list.
        for code in codes {
            if matches!(code, Code::Internal | Code::MethodNotAllowed) {
                continue;
            }
            assert!(
                answered.contains(code.as_str()),
                "{} is listed by no response",
                code.as_str()
            );
        }
    }

    #[test]
    fn every_operation_names_its_security_and_every_reference_resolves() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("security schemes");
        assert_eq!(schemes["user"]["scheme"], "bearer");
        assert_eq!(schemes["user"]["bearerFormat"], "JWT");
        assert_eq!(schemes["admin"]["scheme"], "bearer");
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                if method == "parameters" {
                    continue;
                }
                let security = op["security"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path} names no security"));
                let expected = if path.starts_with("/admin/") {
                    vec!["admin"]
                } else if op["tags"][0] == "buyers" {
                    vec!["user"]
                } else {
                    vec![]
                };
                let named: Vec<&str> = security
                    .iter()
                    .flat_map(|s| s.as_object().expect("a requirement").keys())
                    .map(String::as_str)
                    .collect();
                assert_eq!(named, expected, "{method} {path}");
            }
        }
        fn walk(doc: &Value, v: &Value) {
            match v {
                Value::Object(map) => {
                    if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                        let pointer = r.strip_prefix('#').expect("a local $ref");
                        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
                    }
                    map.values().for_each(|v| walk(doc, v));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v)),
                _ => {}
            }
        }
        walk(&doc, &doc);
    }
}

//! `GET /`, `GET /console/` and `GET /assets/{file}`: the sale page and the
//! operator console of `web/`, so `seckill serve` is a whole demo. In
//! production nginx serves the same files from `web/` and never asks the
//! gateway for them (see `docs/web.md`).
//!
//! The files are a fixed list compiled into the binary (`include_str!`);
//! nothing is read from the disk at run time and no path reaches the file
//! system. Each answer carries its content type, a strong `ETag` (the start
//! of the file's SHA-256; `If-None-Match` gets `304`), `Cache-Control:
//! no-cache` (the names are not versioned, so a browser revalidates, which
//! costs a `304`), and a Content-Security-Policy that allows scripts, styles
//! and requests of this origin only, no inline script, and images of this
//! origin or `data:` (the captcha arrives as base64 PNG).

use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, HeaderValue, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};

use crate::http::request::{Request, content_etag};
use crate::http::{ApiError, Response, empty};

/// The policy of every page and asset: this origin only, no inline script.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

/// Revalidate every time: the names carry no version.
const CACHE_CONTROL_VALUE: &str = "no-cache";

/// One file of `web/`.
pub struct Asset {
    /// Its path under `web/`.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The sale page, at `/`.
pub const SALE_PAGE: Asset = Asset {
    path: "index.html",
    content_type: HTML,
    body: include_str!("../../../web/index.html"),
};

/// The operator console, at `/console/`.
pub const CONSOLE_PAGE: Asset = Asset {
    path: "console/index.html",
    content_type: HTML,
    body: include_str!("../../../web/console/index.html"),
};

/// What the pages load, at `/assets/{file}`.
pub const ASSETS: [Asset; 4] = [
    Asset {
        path: "assets/common.js",
        content_type: JS,
        body: include_str!("../../../web/assets/common.js"),
    },
    Asset {
        path: "assets/sale.js",
        content_type: JS,
        body: include_str!("../../../web/assets/sale.js"),
    },
    Asset {
        path: "assets/console.js",
        content_type: JS,
        body: include_str!("../../../web/assets/console.js"),
    },
    Asset {
        path: "assets/style.css",
        content_type: CSS,
        body: include_str!("../../../web/assets/style.css"),
    },
];

/// The `ETag` of every file, in the order of [`all`].
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| all().map(etag_of).collect());

/// Every file served: the two pages, then the assets.
pub fn all() -> impl Iterator<Item = &'static Asset> {
    [&SALE_PAGE, &CONSOLE_PAGE].into_iter().chain(ASSETS.iter())
}

fn etag_of(asset: &Asset) -> HeaderValue {
    content_etag(asset.body.as_bytes())
}

/// `GET /`
pub async fn sale_page(req: Request) -> Result<Response, ApiError> {
    Ok(serve(&req, &SALE_PAGE))
}

/// `GET /console/`
pub async fn console_page(req: Request) -> Result<Response, ApiError> {
    Ok(serve(&req, &CONSOLE_PAGE))
}

/// `GET /assets/{file}`: one of [`ASSETS`], else `404 not_found`.
pub async fn asset(req: Request) -> Result<Response, ApiError> {
    let path = req.parts.uri.path().trim_start_matches('/');
    let found = ASSETS
        .iter()
        .find(|a| a.path == path)
        .ok_or_else(ApiError::not_found)?;
    Ok(serve(&req, found))
}

fn serve(req: &Request, asset: &'static Asset) -> Response {
    let index = all()
        .position(|a| a.path == asset.path)
        .expect("a listed asset");
    let tag = &ETAGS[index];
    let mut res = if req.holds_current(tag) {
        empty(StatusCode::NOT_MODIFIED)
    } else {
        let mut res = hyper::Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        res
    };
    let headers = res.headers_mut();
    headers.insert(ETAG, tag.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL_VALUE));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{ASSETS, CONSOLE_PAGE, SALE_PAGE, all};

    /// Every `src="…"` and `href="…"` of a page that is not a link to the
    /// other page, resolved against the page's directory.
    fn references(page: &str, dir: &str) -> Vec<String> {
        let mut out = Vec::new();
        for attr in ["src=\"", "href=\""] {
            for part in page.split(attr).skip(1) {
                let target = part.split('"').next().unwrap_or_default();
                let resolved = if let Some(up) = target.strip_prefix("../") {
                    up.to_string()
                } else {
                    format!("{dir}{target}")
                };
                out.push(resolved);
            }
        }
        out
    }

    #[test]
    fn every_file_a_page_loads_is_served_and_every_served_file_is_loaded() {
        let served: BTreeSet<&str> = ASSETS.iter().map(|a| a.path).collect();
        let mut loaded = BTreeSet::new();
        for (page, dir) in [(SALE_PAGE.body, ""), (CONSOLE_PAGE.body, "console/")] {
            for r in references(page, dir) {
                // Links between the pages ("console/", "../").
                if r.is_empty() || r.ends_with('/') {
                    continue;
                }
                assert!(served.contains(r.as_str()), "{r} is loaded but not served");
                loaded.insert(r);
            }
        }
        let loaded: BTreeSet<&str> = loaded.iter().map(String::as_str).collect();
        assert_eq!(loaded, served, "a served asset no page loads");
    }

    #[test]
    fn no_page_has_inline_script_or_style_or_an_outside_resource() {
        for a in all() {
            if !a.content_type.starts_with("text/html") {
                continue;
            }
            for (i, part) in a.body.split("<script").enumerate().skip(1) {
                let tag = part.split('>').next().unwrap_or_default();
                assert!(tag.contains("src="), "{}: inline script #{i}", a.path);
            }
            assert!(!a.body.contains("<style"), "{}: inline style", a.path);
            assert!(!a.body.contains(" style="), "{}: style attribute", a.path);
            let handler = a.body.split(" on").skip(1).any(|rest| {
                let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
                !name.is_empty() && rest[name.len()..].starts_with('=')
            });
            assert!(!handler, "{}: inline event handler", a.path);
            assert!(
                !a.body.contains("http://") && !a.body.contains("https://"),
                "{}: an outside resource",
                a.path
            );
        }
    }

    #[test]
    fn the_pages_keep_no_token_in_storage() {
        for a in all() {
            for word in [
                "localStorage",
                "sessionStorage",
                "document.cookie",
                "indexedDB",
            ] {
                assert!(!a.body.contains(word), "{} uses {word}", a.path);
            }
        }
    }

    #[test]
    fn every_error_code_of_the_document_has_a_sentence() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::http::handlers::openapi::DOCUMENT).expect("JSON");
        let common = ASSETS
            .iter()
            .find(|a| a.path == "assets/common.js")
            .expect("common.js")
            .body;
        let table = common
            .split("const SENTENCES = {")
            .nth(1)
            .and_then(|rest| rest.split("};").next())
            .expect("the SENTENCES table");
        for code in doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("ErrorCode")
        {
            let code = code.as_str().expect("a string");
            assert!(
                table.contains(&format!("\n  {code}: \"")),
                "common.js has no sentence for {code}"
            );
        }
    }
}

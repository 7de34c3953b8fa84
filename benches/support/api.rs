//! What the API benches share: three in-process stages of the model, an origin driver, and
//! the API served by axum on a loopback socket in front of it; HTTP/1.1 requests to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_api::{ApiConfig, ApiState, ServedModel, router};
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo};
use shoal_model_shards::Model;
use shoal_worker::net::{Node, NodeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::start_stages;

/// A 3-stage swarm and its API.
pub struct ApiBench {
    addr: SocketAddr,
    /// The driver behind the API, for benches that also call it directly.
    #[allow(dead_code)]
    pub driver: Arc<Driver>,
    origin: Node,
    nodes: Vec<Node>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ApiBench {
    /// `model` in three stages, served as `served` changes the API's view of it.
    pub async fn start(model: &Model, model_id: [u8; 32], served: impl FnOnce(&mut ServedModel)) -> Self {
        let nodes = start_stages(model, model_id, 3).await;
        let origin = Node::bind(NodeOptions::loopback()).await.expect("origin binds");
        let driver = Arc::new(Driver::new(
            origin.clone(),
            ModelInfo::of(model).expect("model info"),
            DriverConfig { step_timeout: Duration::from_secs(60), ..DriverConfig::default() },
        ));
        for node in &nodes {
            driver.add_peer(node.addr()).await.expect("stage answers");
        }
        let mut model_view = ServedModel::of(model, "bench").expect("tokenizer");
        served(&mut model_view);
        let state =
            Arc::new(ApiState::new(driver.clone(), model_view, ApiConfig::default()).expect("metrics"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
        Self { addr, driver, origin, nodes, server }
    }

    /// One HTTP/1.1 request on a fresh connection, read to the end; returns the body of a 200.
    pub async fn http(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.split_once("\r\n\r\n").expect("a body").1.to_owned()
    }

    /// Stops the server and the nodes.
    pub async fn shutdown(self) {
        self.server.abort();
        self.origin.shutdown().await;
        for node in &self.nodes {
            node.shutdown().await;
        }
    }
}

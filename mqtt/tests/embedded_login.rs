//! The embedded broker takes only the pipeline's and the gate's user names
//! with the node's token.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, Packet};
use vitaltrail_core::auth::Token;
use vitaltrail_mqtt::embedded::{EmbeddedConfig, start};
use vitaltrail_mqtt::{Login, MqttEndpoint, PIPELINE_USER};

fn free() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether a client with this login gets a successful CONNACK.
async fn connects(port: u16, login: Option<Login>) -> bool {
    let mut e = MqttEndpoint::plain("127.0.0.1", port);
    e.login = login;
    let (_c, mut el) = AsyncClient::new(e.options("login-test"), 10);
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(_)) | Err(_) => return false,
            }
        }
    })
    .await;
    r.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_token_opens_the_embedded_broker() {
    let listen = free();
    let token = Token::generate(&mut rand::rngs::OsRng);
    let _dead = start(&EmbeddedConfig {
        listen,
        token: Some(token.clone()),
        max_connections: 100,
    })
    .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let login = |user: &str, t: &Token| {
        Some(Login {
            username: user.into(),
            password: t.clone(),
        })
    };
    let other = Token::generate(&mut rand::rngs::OsRng);
    assert!(!connects(listen.port(), None).await, "no login");
    assert!(
        !connects(listen.port(), login(PIPELINE_USER, &other)).await,
        "wrong token"
    );
    assert!(
        !connects(listen.port(), login("someone", &token)).await,
        "wrong user"
    );
    assert!(
        connects(listen.port(), login(PIPELINE_USER, &token)).await,
        "the pipeline"
    );
}

//! Where capnp-rpc runs (broker ↔ mmctl, broker ↔ controller): one way to
//! put a two-party vat network over a tokio stream.

use capnp_rpc::{rpc_twoparty_capnp, twoparty};
use futures::io::{BufReader, BufWriter};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// A two-party network over `reader`/`writer`, buffered both ways. A side
/// that serves peers it does not trust bounds how much one message may
/// make it read (`traversal_limit_words`, 8-byte words; `None`: capnp's
/// default).
pub fn vat_network<R, W>(
    reader: R,
    writer: W,
    side: rpc_twoparty_capnp::Side,
    traversal_limit_words: Option<usize>,
) -> twoparty::VatNetwork<BufReader<Compat<R>>>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let mut options = capnp::message::ReaderOptions::new();
    if let Some(words) = traversal_limit_words {
        options.traversal_limit_in_words(Some(words));
    }
    twoparty::VatNetwork::new(BufReader::new(reader.compat()), BufWriter::new(writer.compat_write()), side, options)
}

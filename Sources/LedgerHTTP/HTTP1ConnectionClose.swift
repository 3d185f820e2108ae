import NIOCore
import NIOHTTP1

/// Closes the connection after the answer where HTTP/1.1 says so but the server would keep it open: an HTTP/1.0
/// request without `Connection: keep-alive` (RFC 9112 section 9.3), and `CONNECT`, which this service does not
/// tunnel (its answer would otherwise leave the client waiting for a body that never ends).
///
/// Hummingbird closes after answering a request that says `Connection: close`, but the requests it hands on are
/// HTTPTypes values, which carry no HTTP version. So this handler sits before that conversion, right after NIO's
/// request decoder, and marks such requests `Connection: close`. `Installer` is what the server configuration can
/// add (its handlers go after the conversion); it puts the marker in its place.
final class HTTP1ConnectionClose: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var part = unwrapInboundIn(data)
        if case .head(var head) = part, !head.isKeepAlive || head.method == .CONNECT {
            head.headers.replaceOrAdd(name: "connection", value: "close")
            part = .head(head)
        }
        context.fireChannelRead(wrapInboundOut(part))
    }

    final class Installer: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = NIOAny  // never read: everything passes through

        func handlerAdded(context: ChannelHandlerContext) {
            let pipeline = context.pipeline.syncOperations
            guard let decoder = try? pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self) else {
                preconditionFailure("no HTTP/1 request decoder in the pipeline")
            }
            try? pipeline.addHandler(HTTP1ConnectionClose(), position: .after(decoder.handler))
        }
    }
}

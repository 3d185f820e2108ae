import NIOCore
import NIOHTTP1
import NIOPosix

/// One keep-alive HTTP/1.1 connection of the load generator, with one request in flight at a time (as a client
/// that waits for each answer, which is what a payments client does).
///
/// A plain NIO channel rather than a general-purpose HTTP client: the generator shares two cores with the service
/// and PostgreSQL, so every microsecond it spends is taken from what it measures.
final class BenchConnection: Sendable {
    private let channel: any Channel
    private let handler: ResponseCollector

    struct Response: Sendable {
        var status: Int
        var body: ByteBuffer
        var replayed: Bool
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private init(channel: any Channel, handler: ResponseCollector) {
        self.channel = channel
        self.handler = handler
    }

    static func connect(host: String, port: Int, group: any EventLoopGroup) async throws -> BenchConnection {
        let handler = ResponseCollector()
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port).get()
        return BenchConnection(channel: channel, handler: handler)
    }

    /// A request ready to send again and again (replays send the very same one).
    struct Request: Sendable {
        var head: HTTPRequestHead
        var body: ByteBuffer
    }

    /// Sends one complete request and waits for the whole response.
    func send(_ request: Request) async throws -> Response {
        let promise = channel.eventLoop.makePromise(of: Response.self)
        let handler = self.handler
        let channel = self.channel
        channel.eventLoop.execute {
            handler.expect(promise)
            channel.write(HTTPClientRequestPart.head(request.head), promise: nil)
            channel.write(HTTPClientRequestPart.body(.byteBuffer(request.body)), promise: nil)
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        }
        return try await promise.futureResult.get()
    }

    /// Runs `body` on a new connection and closes it before returning or throwing: the caller shuts the event loop
    /// group down right after the run, so no close may be left behind for later.
    static func with<T: Sendable>(
        host: String, port: Int, group: any EventLoopGroup, _ body: (BenchConnection) async throws -> T
    ) async throws -> T {
        let connection = try await connect(host: host, port: port, group: group)
        do {
            let result = try await body(connection)
            try? await connection.channel.close()
            return result
        } catch {
            try? await connection.channel.close()
            throw error
        }
    }

    /// Builds a request. `Content-Length` is always set; the connection stays open.
    static func request(
        method: HTTPMethod, path: String, host: String, headers: [(String, String)], body: String?
    ) -> Request {
        let bodyBuffer = ByteBuffer(string: body ?? "")
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "Host", value: host)
        for (name, value) in headers { head.headers.add(name: name, value: value) }
        head.headers.add(name: "Content-Length", value: String(bodyBuffer.readableBytes))
        return Request(head: head, body: bodyBuffer)
    }
}

/// Collects the parts of one response and completes the waiting promise. Touched only on its channel's event loop.
private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart

    private var promise: EventLoopPromise<BenchConnection.Response>?
    private var status = 0
    private var replayed = false
    private var body = ByteBuffer()

    func expect(_ promise: EventLoopPromise<BenchConnection.Response>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
            replayed = head.headers.first(name: "Idempotent-Replayed") == "true"
            body.clear()
        case .body(var part):
            body.writeBuffer(&part)
        case .end:
            promise?.succeed(BenchConnection.Response(status: status, body: body, replayed: replayed))
            promise = nil
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise?.fail(BenchConnection.Failure(description: "connection closed"))
        promise = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise?.fail(error)
        promise = nil
        context.close(promise: nil)
    }
}

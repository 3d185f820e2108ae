import HTTPTypes
import Hummingbird
import LedgerCore
import LedgerStore
import NIOCore
import Prometheus

/// What the service says about itself, without auth: `GET /metrics` and `GET /openapi.yaml`.
extension LedgerAPI {
    /// Prometheus text exposition. Pool gauges are sampled now, at scrape time.
    func metrics(_ call: RouteCall) -> Response {
        LedgerMetrics.pool(store.poolStatistics())
        let text = LedgerMetrics.withHelp(metricsRegistry?.emitToBuffer() ?? [])
        var headers: HTTPFields = [:]
        headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: text)))
    }

    /// The OpenAPI 3.1 description of this API.
    func openAPI(_ call: RouteCall) throws -> Response {
        guard let document = OpenAPIDocument.yaml else { throw Problem.notFound() }
        var headers: HTTPFields = [:]
        headers[.contentType] = OpenAPIDocument.mediaType(accepting: call.request.headers[values: .accept])
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: document)))
    }
}

import Foundation

/// The OpenAPI 3.1 description of the API, `Resources/openapi.yaml`, shipped as a SwiftPM resource.
enum OpenAPIDocument {
    static let yaml: String? = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml") else { return nil }
        return try? String(contentsOf: url, encoding: .utf8)
    }()

    /// `application/yaml` (RFC 9512), unless `Accept` names `text/yaml` or `text/*` and not `application/yaml`:
    /// some generated clients read only answers of a `text/` type as text.
    static func mediaType(accepting accept: [String]) -> String {
        let ranges = accept.flatMap { $0.split(separator: ",") }.map {
            $0.split(separator: ";", maxSplits: 1).first.map(String.init)?.trimmingCharacters(in: .whitespaces)
                .lowercased() ?? ""
        }
        if ranges.contains("application/yaml") { return "application/yaml" }
        if ranges.contains("text/yaml") || ranges.contains("text/*") { return "text/yaml" }
        return "application/yaml"
    }
}
